//! The writer socket: applications register here and answer events.
//!
//! Each connection is translated into driver events: a `register` line makes
//! the connection a writer; `ack`/`veto` lines become replies; the connection
//! closing makes the writer gone. Malformed lines get an `error` event back and
//! the connection stays open — a buggy application cannot hurt the daemon.

use std::path::Path;

use freezeframe_netproto::control::{write_line, LineReader};
use freezeframe_netproto::writer::{
    parse_writer_line, WriterEvent, WriterRequest, MAX_WRITER_LINE,
};
use tokio::net::UnixListener;
use tokio::sync::mpsc;

use super::{bind_private_socket, DriverEvent, DriverTx};

pub async fn serve(path: &Path, driver: DriverTx) -> anyhow::Result<()> {
    let listener = bind_private_socket(path)?;
    tokio::spawn(accept_loop(listener, driver));
    Ok(())
}

async fn accept_loop(listener: UnixListener, driver: DriverTx) {
    let mut next_id: u64 = 1;
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let id = next_id;
                next_id += 1;
                tokio::spawn(connection(id, stream, driver.clone()));
            }
            Err(e) => {
                tracing::warn!("writer socket accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn connection(id: u64, stream: tokio::net::UnixStream, driver: DriverTx) {
    let (r, mut w) = stream.into_split();
    let mut reader = LineReader::new(r);
    let (tx, mut rx) = mpsc::unbounded_channel::<WriterEvent>();
    // One task owns the write half so events and error replies never interleave.
    let writer_task = tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            if write_line(&mut w, &ev).await.is_err() {
                break;
            }
        }
    });
    let mut registered = false;
    loop {
        let line = match reader.next_line(MAX_WRITER_LINE).await {
            Ok(Some(l)) => l,
            Ok(None) => break,
            Err(e) => {
                let _ = tx.send(WriterEvent::Error {
                    message: e.to_string(),
                });
                continue;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        match parse_writer_line(&line) {
            Err(message) => {
                let _ = tx.send(WriterEvent::Error { message });
            }
            Ok(WriterRequest::Register {
                name,
                on_error,
                freeze_timeout_ms,
            }) => {
                if registered {
                    let _ = tx.send(WriterEvent::Error {
                        message: "already registered on this connection".into(),
                    });
                    continue;
                }
                if name.is_empty() || name.len() > 128 {
                    let _ = tx.send(WriterEvent::Error {
                        message: "writer name must be 1 to 128 bytes".into(),
                    });
                    continue;
                }
                registered = true;
                let _ = driver.send(DriverEvent::WriterRegistered {
                    id,
                    name,
                    on_error,
                    freeze_timeout_ms,
                    tx: tx.clone(),
                });
            }
            Ok(req) if !registered => {
                let _ = tx.send(WriterEvent::Error {
                    message: format!("register first (got {req:?})"),
                });
            }
            Ok(req) => {
                let _ = driver.send(DriverEvent::WriterReply { id, req });
            }
        }
    }
    if registered {
        let _ = driver.send(DriverEvent::WriterGone { id });
    }
    drop(tx);
    let _ = writer_task.await;
}
