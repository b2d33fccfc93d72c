//! A minimal async client of a node's control socket (`docs/protocol.md`):
//! one JSON request per line, one `{"ok":…}` answer per line, or a stream of
//! answers after `{"op":"events"}`.
//!
//! Why the console has its own: it needs only these few lines, and
//! `freezeframe_netproto::control` is not exported by that crate on the base
//! this console was written against. The request shapes are the ones of
//! `ControlRequest` in `netproto/src/control.rs`; switch to that client once
//! it is public.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use crate::{Error, Result};

/// Longest answer line accepted (the protocol's limit).
pub const MAX_LINE: usize = 4 << 20;

/// The requests the console sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Status,
    SnapshotList,
    SnapshotCreate { timeout_ms: u64 },
    SnapshotDelete { id: u64 },
    Events,
}

impl Request {
    fn to_json(self) -> Value {
        match self {
            Request::Status => json!({"op": "status"}),
            Request::SnapshotList => json!({"op": "snapshot_list"}),
            Request::SnapshotCreate { timeout_ms } => json!({"op": "snapshot_create", "timeout_ms": timeout_ms}),
            Request::SnapshotDelete { id } => json!({"op": "snapshot_delete", "id": id}),
            Request::Events => json!({"op": "events"}),
        }
    }

    /// The request's name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::SnapshotList => "snapshot_list",
            Request::SnapshotCreate { .. } => "snapshot_create",
            Request::SnapshotDelete { .. } => "snapshot_delete",
            Request::Events => "events",
        }
    }
}

/// One connection to a control socket.
#[derive(Debug)]
pub struct Client {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    path: PathBuf,
    line: Vec<u8>,
}

impl Client {
    pub async fn connect(path: &Path) -> Result<Client> {
        let stream =
            UnixStream::connect(path).await.map_err(|source| Error::Connect { path: path.to_path_buf(), source })?;
        let (r, w) = stream.into_split();
        Ok(Client { reader: BufReader::new(r), writer: w, path: path.to_path_buf(), line: Vec::new() })
    }

    /// Sends `req` and waits for its answer; `{"ok":false}` becomes [`Error::Remote`].
    pub async fn call(&mut self, req: Request) -> Result<Value> {
        self.send(req).await?;
        self.answer(req.name()).await?.ok_or_else(|| Error::Closed { path: self.path.clone(), doing: req.name() })
    }

    /// Turns this connection into the event stream; read it with [`Client::next_event`].
    pub async fn subscribe(&mut self) -> Result<()> {
        self.send(Request::Events).await
    }

    /// The next streamed event; `None` when the node closed the stream.
    pub async fn next_event(&mut self) -> Result<Option<Value>> {
        self.answer("events").await
    }

    async fn send(&mut self, req: Request) -> Result<()> {
        let mut line = req.to_json().to_string().into_bytes();
        line.push(b'\n');
        let io = |source| Error::Io { path: self.path.clone(), doing: req.name(), source };
        self.writer.write_all(&line).await.map_err(io)?;
        self.writer.flush().await.map_err(|source| Error::Io { path: self.path.clone(), doing: req.name(), source })
    }

    async fn answer(&mut self, doing: &'static str) -> Result<Option<Value>> {
        self.line.clear();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut self.line)
            .await
            .map_err(|source| Error::Io { path: self.path.clone(), doing, source })?;
        if n == 0 {
            return Ok(None);
        }
        if self.line.last() != Some(&b'\n') && n > MAX_LINE {
            return Err(Error::LineTooLong { path: self.path.clone(), max: MAX_LINE });
        }
        #[derive(serde::Deserialize)]
        struct Answer {
            ok: bool,
            #[serde(default)]
            result: Option<Value>,
            #[serde(default)]
            error: Option<String>,
        }
        let a: Answer = serde_json::from_slice(&self.line)
            .map_err(|e| Error::Malformed { what: doing, detail: e.to_string() })?;
        if a.ok {
            Ok(Some(a.result.unwrap_or(Value::Null)))
        } else {
            Err(Error::Remote(a.error.unwrap_or_else(|| format!("{doing} failed without a reason"))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A one-connection node that answers each request line with the next canned line.
    async fn fake_node(answers: Vec<&'static str>) -> (tempfile_dir::Dir, PathBuf, tokio::task::JoinHandle<Vec<String>>) {
        let dir = tempfile_dir::Dir::new();
        let path = dir.0.join("control.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            for a in answers {
                let mut buf = Vec::new();
                let mut byte = [0u8; 1];
                while s.read(&mut byte).await.unwrap() == 1 && byte[0] != b'\n' {
                    buf.push(byte[0]);
                }
                got.push(String::from_utf8(buf).unwrap());
                s.write_all(a.as_bytes()).await.unwrap();
                s.write_all(b"\n").await.unwrap();
            }
            got
        });
        (dir, path, task)
    }

    /// A throwaway directory without pulling a dependency into the crate.
    mod tempfile_dir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p = std::env::temp_dir().join(format!("ff-gui-client-{}-{n}", std::process::id()));
                let _ = std::fs::remove_dir_all(&p);
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[tokio::test]
    async fn requests_go_out_as_protocol_lines_and_errors_come_back_as_remote() {
        let (_dir, path, node) =
            fake_node(vec![r#"{"ok":true,"result":{"deleted":7}}"#, r#"{"ok":false,"error":"no snapshot 9 on n1"}"#])
                .await;
        let mut c = Client::connect(&path).await.unwrap();
        assert_eq!(c.call(Request::SnapshotDelete { id: 7 }).await.unwrap(), json!({"deleted": 7}));
        let err = c.call(Request::SnapshotDelete { id: 9 }).await.unwrap_err();
        assert_eq!(err.to_string(), "no snapshot 9 on n1");
        let sent = node.await.unwrap();
        assert_eq!(sent[0], r#"{"id":7,"op":"snapshot_delete"}"#);
    }

    #[tokio::test]
    async fn a_garbled_answer_is_an_error_naming_the_request() {
        let (_dir, path, _node) = fake_node(vec!["this is not json"]).await;
        let mut c = Client::connect(&path).await.unwrap();
        let err = c.call(Request::Status).await.unwrap_err();
        assert!(err.to_string().contains("status"), "{err}");
    }

    #[tokio::test]
    async fn a_missing_socket_says_which_path() {
        let err = Client::connect(Path::new("/nonexistent/ff/control.sock")).await.unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ff/control.sock"), "{err}");
    }
}
