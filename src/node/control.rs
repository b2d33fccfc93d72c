//! The control socket: the CLI's and the console's way into a node.
//!
//! Requests that need the protocol (status, snapshot create) go to the
//! driver; catalog requests (list, show, delete, verify) are answered from the
//! shared state directly, so any node answers for the whole cluster; `events`
//! turns the connection into a stream of phase events.

use std::path::Path;
use std::sync::Arc;

use freezeframe_netproto::control::{
    write_line, ControlRequest, ControlResponse, LineReader, MAX_LINE,
};
use serde_json::{json, Value};
use tokio::net::UnixListener;
use tokio::sync::oneshot;

use super::{bind_private_socket, DriverEvent, DriverTx, Shared};

pub async fn serve(path: &Path, driver: DriverTx, shared: Arc<Shared>) -> anyhow::Result<()> {
    let listener = bind_private_socket(path)?;
    tokio::spawn(accept_loop(listener, driver, shared));
    Ok(())
}

async fn accept_loop(listener: UnixListener, driver: DriverTx, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(connection(stream, driver.clone(), shared.clone()));
            }
            Err(e) => {
                tracing::warn!("control socket accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn connection(stream: tokio::net::UnixStream, driver: DriverTx, shared: Arc<Shared>) {
    let (r, mut w) = stream.into_split();
    let mut reader = LineReader::new(r);
    loop {
        let line = match reader.next_line(MAX_LINE).await {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e) => {
                if write_line(&mut w, &ControlResponse::err(e.to_string()))
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
        };
        let req: ControlRequest = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                let resp = ControlResponse::err(format!("malformed control request: {e}"));
                if write_line(&mut w, &resp).await.is_err() {
                    return;
                }
                continue;
            }
        };
        if req == ControlRequest::Events {
            let mut rx = shared.events.subscribe();
            loop {
                match rx.recv().await {
                    Ok(ev) => {
                        if write_line(&mut w, &ControlResponse::ok(ev)).await.is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!("event subscriber lagged by {n} events");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        }
        let resp = match answer(req, &driver, &shared).await {
            Ok(v) => ControlResponse::ok(v),
            Err(e) => ControlResponse::err(format!("{e:#}")),
        };
        if write_line(&mut w, &resp).await.is_err() {
            return;
        }
    }
}

async fn answer(
    req: ControlRequest,
    driver: &DriverTx,
    shared: &Arc<Shared>,
) -> anyhow::Result<Value> {
    match req {
        ControlRequest::Status => {
            let (tx, rx) = oneshot::channel();
            driver
                .send(DriverEvent::Status { reply: tx })
                .map_err(|_| anyhow::anyhow!("node is shutting down"))?;
            Ok(rx.await?)
        }
        ControlRequest::SnapshotCreate { timeout_ms } => {
            let (tx, rx) = oneshot::channel();
            driver
                .send(DriverEvent::Create {
                    timeout_ms,
                    reply: tx,
                })
                .map_err(|_| anyhow::anyhow!("node is shutting down"))?;
            Ok(rx.await?)
        }
        ControlRequest::SnapshotList => {
            let s = shared.clone();
            Ok(tokio::task::spawn_blocking(move || s.snapshot_list()).await??)
        }
        ControlRequest::SnapshotShow { id } => {
            let s = shared.clone();
            Ok(tokio::task::spawn_blocking(move || s.snapshot_show(id)).await??)
        }
        ControlRequest::SnapshotDelete { id } => {
            let (tx, rx) = oneshot::channel();
            driver
                .send(DriverEvent::Delete { id, reply: tx })
                .map_err(|_| anyhow::anyhow!("node is shutting down"))?;
            rx.await??;
            Ok(json!({ "deleted": id }))
        }
        ControlRequest::SnapshotVerify { id } => {
            let s = shared.clone();
            Ok(tokio::task::spawn_blocking(move || s.snapshot_verify(id)).await??)
        }
        ControlRequest::Events => unreachable_events(),
        ControlRequest::NodeFence { node, reason } => {
            let s = shared.clone();
            Ok(tokio::task::spawn_blocking(move || s.fence(&node, reason)).await??)
        }
        ControlRequest::NodeUnfence { node } => {
            let s = shared.clone();
            Ok(tokio::task::spawn_blocking(move || s.unfence(&node)).await??)
        }
    }
}

/// `events` is handled before `answer` because it takes over the connection.
fn unreachable_events() -> anyhow::Result<Value> {
    anyhow::bail!("events must be the only request on its connection")
}
