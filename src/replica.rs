//! `freezeframe replica serve|push|list|mount|init-identity`: keep a volume's
//! snapshots on a secondary host (seed 004). Network and terminal glue only:
//! what to send, how to store and check it live in `freezeframe_core::replica`.
//!
//! The secondary is `replica serve` with a `replica.toml` (see
//! `assets/replica.toml`): a name, a QUIC listen address, a certificate from the
//! cluster CA and the node names allowed to push. `replica init-identity`
//! issues that certificate from the cluster folder's `ca.pem`/`ca.key` and
//! writes a ready `replica.toml`.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use freezeframe_core::replica::source::{self, BatchReader};
use freezeframe_core::replica::store::{Incoming, ReplicaStore};
use freezeframe_core::replica::wire::{
    BlockHeader, Blocks, Reply, Request, Summary, VolumeListing,
};
use freezeframe_core::replica::BlockCv;
use freezeframe_core::volume::Volume;
use freezeframe_netproto::{
    CaCertificate, ClusterCa, Frame, FrameCodec, MemberList, NodeIdentity, PeerConnection,
    PeerEndpoint,
};
use serde::{Deserialize, Serialize};

/// Frames of block data: up to this many bytes of blocks each (the DATA limit is 16 MiB).
const FRAME_DATA_BYTES: usize = 8 << 20;
/// The secondary fsyncs and journals after this much block data.
const SYNC_BYTES: u64 = 32 << 20;
/// Test knob on the secondary: sleep this many ms per frame and journal every frame.
const THROTTLE_ENV: &str = "FREEZEFRAME_REPLICA_THROTTLE";

/// Flags of `freezeframe replica`.
#[derive(Args, Debug)]
pub struct ReplicaArgs {
    #[command(subcommand)]
    command: ReplicaCommand,
}

#[derive(Subcommand, Debug)]
enum ReplicaCommand {
    /// Run a secondary that stores replicas in DIR (--config is its replica.toml).
    Serve {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Push a snapshot of this node's volume (--config is its node.toml) to a secondary.
    Push {
        /// The secondary's QUIC address.
        #[arg(long)]
        to: SocketAddr,
        /// The secondary's name (in its certificate).
        #[arg(long, default_value = "replica")]
        name: String,
        /// A snapshot id, or `latest` (the newest sealed one).
        #[arg(long, default_value = "latest")]
        snapshot: String,
        /// Hash the whole snapshot for the image check instead of reusing the
        /// saved chaining values of the base's unchanged blocks.
        #[arg(long)]
        full_hash: bool,
        #[arg(long)]
        json: bool,
    },
    /// The replicas a secondary holds: from its directory (--dir) or asking it (--to).
    List {
        #[arg(long, conflicts_with = "to", required_unless_present = "to")]
        dir: Option<PathBuf>,
        #[arg(long)]
        to: Option<SocketAddr>,
        #[arg(long, default_value = "replica")]
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Mount the replica snapshots read-only (snapshots/<id>/volume.img, manifest.json).
    Mount {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        mount: PathBuf,
        /// The volume uuid, when DIR holds more than one.
        #[arg(long)]
        volume: Option<String>,
    },
    /// Write a replica snapshot's raw image to stdout (every block checked on the way).
    Read {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        snapshot: u64,
        /// The volume uuid, when DIR holds more than one.
        #[arg(long)]
        volume: Option<String>,
    },
    /// Issue a secondary's certificate from a cluster CA and write its replica.toml.
    InitIdentity {
        /// Folder holding ca.pem and ca.key (a `cluster init` folder).
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long, default_value = "replica")]
        name: String,
        /// Where to write node.pem, node.key, ca.pem and replica.toml.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "0.0.0.0:7400")]
        listen: SocketAddr,
        /// Node names allowed to push (default: the nodes of CA_DIR/cluster.toml).
        #[arg(long, value_delimiter = ',')]
        allow: Vec<String>,
    },
}

/// `replica.toml`: the secondary's identity and who may push to it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaFile {
    pub replica: ReplicaSection,
    pub tls: crate::config::TlsSection,
    pub cluster: AllowSection,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaSection {
    /// Must be the name in its certificate; pushers dial it with `--name`.
    pub name: String,
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowSection {
    pub ca_cert: PathBuf,
    /// Node names allowed to push or list.
    pub members: Vec<String>,
}

impl ReplicaFile {
    fn load(path: &Path) -> Result<ReplicaFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read replica config {}", path.display()))?;
        let mut f: ReplicaFile = toml::from_str(&text)
            .with_context(|| format!("replica config {} is not valid", path.display()))?;
        let base = path
            .canonicalize()?
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/"));
        for p in [&mut f.tls.cert, &mut f.tls.key, &mut f.cluster.ca_cert] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if f.cluster.members.is_empty() {
            bail!(
                "{}: [cluster] members is empty: nobody could push",
                path.display()
            );
        }
        Ok(f)
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Runs one `replica` subcommand.
pub fn run(args: ReplicaArgs, config: Option<&Path>) -> Result<()> {
    match args.command {
        ReplicaCommand::Serve { dir } => {
            let path =
                config.ok_or_else(|| anyhow!("replica serve needs --config replica.toml"))?;
            let cfg = ReplicaFile::load(path)?;
            runtime()?.block_on(serve(cfg, dir))
        }
        ReplicaCommand::Push {
            to,
            name,
            snapshot,
            full_hash,
            json,
        } => {
            let cfg = crate::config::resolve(config)?;
            let want = match snapshot.as_str() {
                "latest" => None,
                s => Some(s.parse::<u64>().with_context(|| {
                    format!("--snapshot {s:?}: expected a snapshot id or `latest`")
                })?),
            };
            let report = runtime()?.block_on(push(&cfg, to, &name, want, full_hash))?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print_report(&report);
            }
            Ok(())
        }
        ReplicaCommand::List {
            dir,
            to,
            name,
            json,
        } => {
            let volumes = match (dir, to) {
                (Some(dir), _) => ReplicaStore::open(&dir)?.list(None)?,
                (None, Some(to)) => {
                    let cfg = crate::config::resolve(config)?;
                    runtime()?.block_on(async {
                        let (_ep, conn) = dial(&cfg, to, &name).await?;
                        list_remote(&conn, None).await
                    })?
                }
                (None, None) => bail!("give --dir DIR or --to ADDR"),
            };
            print_listing(&volumes, json)
        }
        ReplicaCommand::Mount { dir, mount, volume } => mount_replica(&dir, &mount, volume),
        ReplicaCommand::Read {
            dir,
            snapshot,
            volume,
        } => {
            let store = ReplicaStore::open(&dir)?;
            let v = store.volume(&pick_volume(&store, volume)?)?;
            let img = v.image(snapshot)?;
            let mut out = std::io::stdout().lock();
            let mut buf = vec![0u8; 1 << 20];
            let mut at = 0u64;
            loop {
                let n = img.read_at(&mut buf, at)?;
                if n == 0 {
                    break;
                }
                std::io::Write::write_all(&mut out, &buf[..n]).context("writing stdout")?;
                at += n as u64;
            }
            std::io::Write::flush(&mut out).context("writing stdout")?;
            Ok(())
        }
        ReplicaCommand::InitIdentity {
            ca_dir,
            name,
            out,
            listen,
            allow,
        } => {
            println!(
                "{}",
                init_identity(&ca_dir, &name, &out, listen, allow)?.display()
            );
            Ok(())
        }
    }
}

// ---------------------------------------------------------------- secondary

async fn serve(cfg: ReplicaFile, dir: PathBuf) -> Result<()> {
    let store = Arc::new(ReplicaStore::open(&dir)?);
    let identity = NodeIdentity::load(&cfg.tls.cert, &cfg.tls.key)?;
    if identity.node_name != cfg.replica.name {
        bail!(
            "replica config names the secondary {:?} but its certificate {} is for {:?}",
            cfg.replica.name,
            cfg.tls.cert.display(),
            identity.node_name
        );
    }
    let ca = CaCertificate::load(&cfg.cluster.ca_cert)?;
    let ep = PeerEndpoint::bind(
        cfg.replica.listen,
        &identity,
        &ca,
        MemberList::new(cfg.cluster.members.clone()),
    )?;
    tracing::info!(name = %cfg.replica.name, addr = %ep.local_addr()?, dir = %dir.display(), "replica secondary serving");
    eprintln!(
        "replica secondary {} listening on {} (replicas in {})",
        cfg.replica.name,
        ep.local_addr()?,
        dir.display()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            conn = ep.accept() => {
                let conn = conn?;
                tracing::info!(peer = %conn.peer_name(), addr = %conn.remote_address(), "pusher connected");
                tokio::spawn(serve_connection(conn, store.clone()));
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    ep.close("secondary shutting down").await;
    Ok(())
}

async fn serve_connection(conn: PeerConnection, store: Arc<ReplicaStore>) {
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                tokio::spawn(serve_stream(
                    conn.peer_name().to_string(),
                    send,
                    recv,
                    store.clone(),
                ));
            }
            Err(e) => {
                tracing::info!(peer = %conn.peer_name(), "connection ended: {e}");
                return;
            }
        }
    }
}

type Send = freezeframe_netproto::FramedSend<freezeframe_netproto::quinn::SendStream>;
type Recv = freezeframe_netproto::FramedRecv<freezeframe_netproto::quinn::RecvStream>;

/// One request: never panics on what the peer sends; any failure is a
/// `Reply::Error` to the peer and a log line, and the server carries on.
async fn serve_stream(peer: String, mut send: Send, mut recv: Recv, store: Arc<ReplicaStore>) {
    send.set_codec(FrameCodec::DATA);
    recv.set_codec(FrameCodec::DATA);
    let outcome = match recv.recv::<Request>().await {
        Ok(Request::List { volume }) => {
            let s = store.clone();
            match tokio::task::spawn_blocking(move || s.list(volume.as_deref())).await {
                Ok(Ok(volumes)) => send
                    .send(&Reply::List { volumes })
                    .await
                    .map_err(anyhow::Error::from),
                Ok(Err(e)) => Err(e.into()),
                Err(e) => Err(anyhow!("listing failed: {e}")),
            }
        }
        Ok(Request::Begin(plan)) => receive(&peer, plan, &mut send, &mut recv, store).await,
        Ok(Request::Commit { .. }) => Err(anyhow!("commit without a transfer on this stream")),
        Err(e) => Err(anyhow!("bad request: {e}")),
    };
    if let Err(e) = outcome {
        tracing::warn!(%peer, "replica request failed: {e:#}");
        let _ = send
            .send(&Reply::Error {
                message: format!("{e:#}"),
            })
            .await;
        recv.stop();
    }
    let _ = send.finish().await;
}

fn throttle() -> Option<Duration> {
    std::env::var(THROTTLE_ENV)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|&ms| ms > 0)
        .map(Duration::from_millis)
}

/// Receives one push: blocks go to a writer thread through a small queue (so
/// the network keeps flowing while it hashes, writes and fsyncs).
async fn receive(
    peer: &str,
    plan: freezeframe_core::replica::wire::Plan,
    send: &mut Send,
    recv: &mut Recv,
    store: Arc<ReplicaStore>,
) -> Result<()> {
    if plan.source_node != peer {
        bail!(
            "the plan says it comes from node {:?} but the connection is from {peer:?}",
            plan.source_node
        );
    }
    tracing::info!(%peer, volume = %plan.volume, snapshot = plan.snapshot, base = ?plan.base, blocks = plan.blocks, "push begins");
    let p = plan.clone();
    let s = store.clone();
    let incoming: Incoming = tokio::task::spawn_blocking(move || s.begin(&p)).await??;
    if incoming.resumed_blocks() > 0 {
        tracing::info!(%peer, snapshot = plan.snapshot, resumed = incoming.resumed_blocks(), "resuming from the journal");
    }
    send.send(&Reply::Ready {
        have: incoming.have_ranges(),
    })
    .await?;

    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Vec<BlockHeader>, Vec<u8>)>(4);
    let slow = throttle();
    let mut writer = tokio::task::spawn_blocking(move || -> freezeframe_core::Result<Incoming> {
        let mut incoming = incoming;
        while let Some((headers, data)) = rx.blocking_recv() {
            incoming.put(&headers, &data)?;
            if let Some(d) = slow {
                std::thread::sleep(d);
                incoming.sync()?;
            } else if incoming.pending_bytes() >= SYNC_BYTES || rx.is_empty() {
                incoming.sync()?;
            }
        }
        incoming.sync()?;
        Ok(incoming)
    });
    let mut tx = Some(tx);
    let finish_writer = |tx: &mut Option<_>| {
        drop(tx.take());
    };
    let commit = loop {
        let frame = tokio::select! {
            f = recv.recv_frame() => f,
            // The writer ends before commit only on an error (a bad block): answer at
            // once, without waiting for the sender's next frame.
            done = &mut writer => {
                return match done? {
                    Err(e) => Err(e.into()),
                    Ok(_) => Err(anyhow!("the block writer stopped")),
                };
            }
        };
        match frame {
            Ok(Some(Frame::JsonWithData { json, data })) => {
                let blocks: Blocks = match serde_json::from_slice(&json) {
                    Ok(b) => b,
                    Err(e) => {
                        finish_writer(&mut tx);
                        let _ = writer.await;
                        bail!("a block frame's header is not valid: {e}");
                    }
                };
                let sent = match &tx {
                    Some(t) => t.send((blocks.blocks, data)).await.is_ok(),
                    None => false,
                };
                if !sent {
                    // The writer stopped: its error is the answer.
                    finish_writer(&mut tx);
                    return match writer.await? {
                        Err(e) => Err(e.into()),
                        Ok(_) => Err(anyhow!("the block writer stopped")),
                    };
                }
            }
            Ok(Some(Frame::Json(json))) => match serde_json::from_slice::<Request>(&json) {
                Ok(Request::Commit { blake3 }) => break blake3,
                Ok(other) => {
                    finish_writer(&mut tx);
                    let _ = writer.await;
                    bail!("expected blocks or commit, got {other:?}");
                }
                Err(e) => {
                    finish_writer(&mut tx);
                    let _ = writer.await;
                    bail!("expected blocks or commit: {e}");
                }
            },
            Ok(Some(Frame::Binary(_))) => {
                finish_writer(&mut tx);
                let _ = writer.await;
                bail!("a bare binary frame where blocks or commit were expected");
            }
            Ok(None) => {
                finish_writer(&mut tx);
                let got = writer.await??;
                bail!("the sender ended the stream before commit ({} blocks received and journaled; a new push resumes)", got.received_blocks());
            }
            Err(e) => {
                finish_writer(&mut tx);
                let _ = writer.await;
                return Err(e.into());
            }
        }
    };
    finish_writer(&mut tx);
    let incoming = writer.await??;
    let received = incoming.received_blocks();
    let info = tokio::task::spawn_blocking(move || incoming.commit(&commit)).await??;
    tracing::info!(%peer, snapshot = info.id, blake3 = %info.blake3, received, "replica snapshot complete");
    send.send(&Reply::Done(Summary {
        snapshot: info,
        blocks_received: received,
    }))
    .await?;
    Ok(())
}

// ---------------------------------------------------------------- sender

fn unspecified_like(to: SocketAddr) -> SocketAddr {
    match to.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => (Ipv4Addr::LOCALHOST, 0).into(),
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(ip) if ip.is_loopback() => (Ipv6Addr::LOCALHOST, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

/// Connects to the secondary `name` at `to` with this node's identity.
async fn dial(
    cfg: &crate::config::NodeConfig,
    to: SocketAddr,
    name: &str,
) -> Result<(PeerEndpoint, PeerConnection)> {
    let identity = NodeIdentity::load(&cfg.raw.tls.cert, &cfg.raw.tls.key)?;
    let ca = CaCertificate::load(&cfg.raw.cluster.ca_cert)?;
    let ep = PeerEndpoint::bind(
        unspecified_like(to),
        &identity,
        &ca,
        MemberList::new([name.to_string()]),
    )?;
    let conn = ep
        .connect(to, name)
        .await
        .with_context(|| format!("connecting to secondary {name} at {to}"))?;
    Ok((ep, conn))
}

async fn list_remote(conn: &PeerConnection, volume: Option<String>) -> Result<Vec<VolumeListing>> {
    let (mut s, mut r) = conn.open_bi().await?;
    s.set_codec(FrameCodec::DATA);
    r.set_codec(FrameCodec::DATA);
    s.send(&Request::List { volume }).await?;
    let _ = s.finish().await;
    match r.recv::<Reply>().await? {
        Reply::List { volumes } => Ok(volumes),
        Reply::Error { message } => bail!("secondary {}: {message}", conn.peer_name()),
        other => bail!(
            "secondary {} answered a list with {other:?}",
            conn.peer_name()
        ),
    }
}

/// What `replica push --json` prints.
#[derive(Debug, Serialize)]
pub struct PushReport {
    pub volume: String,
    pub snapshot: u64,
    pub base: Option<u64>,
    pub mode: &'static str,
    pub already_complete: bool,
    pub blocks_planned: u64,
    /// Blocks the secondary already had durably from an interrupted push.
    pub blocks_skipped: u64,
    pub blocks_sent: u64,
    /// Listed by the diff areas but equal to the base's block (not sent).
    pub blocks_unchanged: u64,
    pub zero_blocks_sent: u64,
    pub block_size: u32,
    /// Block bytes carried (zero blocks carry none).
    pub data_bytes_sent: u64,
    /// Every frame byte this push wrote to its streams (headers, JSON, data);
    /// QUIC/UDP packet overhead is not counted.
    pub wire_bytes_sent: u64,
    pub wire_bytes_received: u64,
    pub seconds: f64,
    pub mb_per_s: f64,
    pub blake3: Option<String>,
    /// Chaining values of unchanged blocks came from the base's saved values.
    pub hash_from_saved_cvs: bool,
    pub replica: Option<Summary>,
}

fn frame_len_json<T: Serialize>(v: &T) -> u64 {
    8 + serde_json::to_vec(v).map(|b| b.len() as u64).unwrap_or(0)
}

/// Pushes snapshot `want` (or the newest sealed one) to the secondary.
pub async fn push(
    cfg: &crate::config::NodeConfig,
    to: SocketAddr,
    name: &str,
    want: Option<u64>,
    full_hash: bool,
) -> Result<PushReport> {
    let started = Instant::now();
    let volume = cfg.open_volume()?;
    let (ep, conn) = dial(cfg, to, name).await?;
    let res = push_on(cfg, &conn, name, want, full_hash, &volume, started).await;
    // Close politely either way, so the secondary does not wait out an idle timeout.
    ep.close(if res.is_ok() {
        "push done"
    } else {
        "push failed"
    })
    .await;
    res
}

async fn push_on(
    cfg: &crate::config::NodeConfig,
    conn: &PeerConnection,
    name: &str,
    want: Option<u64>,
    full_hash: bool,
    volume: &Volume,
    started: Instant,
) -> Result<PushReport> {
    let volume = volume.clone();
    let remote = list_remote(conn, Some(volume.uuid().to_string())).await?;
    let remote_snaps = remote
        .into_iter()
        .next()
        .map(|v| v.snapshots)
        .unwrap_or_default();
    let target = source::choose_target(&volume, want)?;
    let mut report = PushReport {
        volume: volume.uuid().to_string(),
        snapshot: target.id,
        base: None,
        mode: "full",
        already_complete: false,
        blocks_planned: 0,
        blocks_skipped: 0,
        blocks_sent: 0,
        blocks_unchanged: 0,
        zero_blocks_sent: 0,
        block_size: volume.block_size(),
        data_bytes_sent: 0,
        wire_bytes_sent: frame_len_json(&Request::List {
            volume: Some(volume.uuid().to_string()),
        }),
        wire_bytes_received: 0,
        seconds: 0.0,
        mb_per_s: 0.0,
        blake3: None,
        hash_from_saved_cvs: false,
        replica: None,
    };
    if let Some(have) = remote_snaps.iter().find(|s| s.id == target.id) {
        report.already_complete = true;
        report.blake3 = Some(have.blake3.clone());
        report.seconds = started.elapsed().as_secs_f64();
        return Ok(report);
    }
    let base = source::choose_base(&volume, target.id, &remote_snaps)?;
    let pp = source::make_plan(&volume, &target, base, &cfg.raw.node.name)?;
    report.base = base;
    report.mode = if base.is_some() {
        "incremental"
    } else {
        "full"
    };
    report.blocks_planned = pp.blocks.len() as u64;

    let (mut s, mut r) = conn.open_bi().await?;
    s.set_codec(FrameCodec::DATA);
    r.set_codec(FrameCodec::DATA);
    let begin = Request::Begin(pp.plan.clone());
    s.send(&begin).await?;
    report.wire_bytes_sent += frame_len_json(&begin);
    let ready = r.recv::<Reply>().await?;
    report.wire_bytes_received += frame_len_json(&ready);
    let have: HashSet<u64> = match ready {
        Reply::Ready { have } => have
            .into_iter()
            .flat_map(|(a, b)| a..b.min(a.saturating_add(pp.blocks.len() as u64 + 1)))
            .collect(),
        Reply::Error { message } => bail!("secondary {name} refused the push: {message}"),
        other => bail!("secondary {name} answered begin with {other:?}"),
    };
    report.blocks_skipped = pp.blocks.iter().filter(|b| have.contains(b)).count() as u64;

    // Reading and hashing run on their own thread, a few batches ahead of the network.
    let snap = volume.snapshot(target.id)?;
    let bs = volume.block_size() as usize;
    let per_frame = (FRAME_DATA_BYTES / bs).max(1);
    let (tx, mut rx) = tokio::sync::mpsc::channel(3);
    let n = volume.size() / bs as u64;
    let state_dir = volume.state_dir().to_path_buf();
    let saved_base = match base.filter(|_| !full_hash) {
        Some(b) => match source::load_cvs(&state_dir, b, n, volume.block_size()) {
            Ok(v) => v.map(Arc::new),
            Err(e) => {
                tracing::warn!("ignoring saved chaining values: {e}; hashing the whole snapshot");
                None
            }
        },
        None => None,
    };
    let mut reader = BatchReader::new(snap.clone(), pp.blocks.clone(), have, per_frame);
    if let Some(saved) = &saved_base {
        reader = reader.with_base_cvs(saved.clone());
    }
    let reader_task = tokio::task::spawn_blocking(move || {
        for batch in reader {
            let failed = batch.is_err();
            if tx.blocking_send(batch).is_err() || failed {
                return;
            }
        }
    });
    let mut cvs: Vec<Option<BlockCv>> = vec![None; n as usize];
    let mut send_error = None;
    while let Some(batch) = rx.recv().await {
        let batch = batch?;
        for (b, cv) in &batch.cvs {
            cvs[*b as usize] = Some(*cv);
        }
        if batch.headers.is_empty() {
            continue;
        }
        let header = Blocks {
            blocks: batch.headers,
        };
        let json_len = serde_json::to_vec(&header)?.len() as u64;
        if let Err(e) = s.send_with_data(&header, &batch.data).await {
            send_error = Some(e);
            break;
        }
        report.wire_bytes_sent += 12 + json_len + batch.data.len() as u64;
        report.blocks_sent += header.blocks.len() as u64;
        report.zero_blocks_sent += header.blocks.iter().filter(|h| h.z).count() as u64;
        report.data_bytes_sent += batch.data.len() as u64;
    }
    drop(rx);
    let _ = reader_task.await;
    report.blocks_unchanged = report
        .blocks_planned
        .saturating_sub(report.blocks_skipped + report.blocks_sent);
    if let Some(e) = send_error {
        // The secondary stopped the stream: its reply says why.
        let why = match tokio::time::timeout(Duration::from_secs(3), r.recv::<Reply>()).await {
            Ok(Ok(Reply::Error { message })) => message,
            _ => e.to_string(),
        };
        bail!(
            "push of snapshot {} to secondary {name} failed: {why}",
            target.id
        );
    }

    // The image hash: chaining values of every block, unchanged ones from the base's saved values.
    if let Some(saved) = &saved_base {
        for (i, cv) in saved.iter().enumerate() {
            if cvs[i].is_none() {
                cvs[i] = Some(*cv);
            }
        }
        report.hash_from_saved_cvs = true;
    }
    let snap2 = snap.clone();
    let cvs =
        tokio::task::spawn_blocking(move || -> freezeframe_core::Result<Vec<Option<BlockCv>>> {
            let mut cvs = cvs;
            source::fill_missing_cvs(&snap2, &mut cvs, per_frame)?;
            Ok(cvs)
        })
        .await??;
    let single_snap = snap.clone();
    let root = source::image_hash(&cvs, move || {
        let mut buf = vec![0u8; bs];
        single_snap.read_at(&mut buf, 0)?;
        Ok(buf)
    })?;
    let commit = Request::Commit {
        blake3: root.clone(),
    };
    s.send(&commit).await?;
    report.wire_bytes_sent += frame_len_json(&commit);
    let _ = s.finish().await;
    let reply = r.recv::<Reply>().await.with_context(|| {
        format!(
            "waiting for secondary {name} to complete snapshot {}",
            target.id
        )
    })?;
    report.wire_bytes_received += frame_len_json(&reply);
    match reply {
        Reply::Done(summary) => report.replica = Some(summary),
        Reply::Error { message } => {
            if let (true, Some(b)) = (report.hash_from_saved_cvs, base) {
                // The saved values may be what is wrong: drop them so a retry hashes the whole image.
                let _ = std::fs::remove_file(source::cvs_path(&state_dir, b));
                bail!("secondary {name} did not complete snapshot {}: {message} (the saved chaining values of snapshot {b} were discarded; push again to hash the whole image)", target.id);
            }
            bail!(
                "secondary {name} did not complete snapshot {}: {message}",
                target.id
            )
        }
        other => bail!("secondary {name} answered commit with {other:?}"),
    }
    let all: Vec<BlockCv> = cvs.into_iter().map(|c| c.unwrap_or([0; 32])).collect();
    if let Err(e) = source::store_cvs(&state_dir, target.id, volume.block_size(), &all) {
        tracing::warn!("could not save the chaining values of snapshot {}: {e} (the next push hashes the whole image)", target.id);
    }
    report.blake3 = Some(root);
    report.seconds = started.elapsed().as_secs_f64();
    report.mb_per_s = report.data_bytes_sent as f64 / (1 << 20) as f64 / report.seconds.max(1e-9);
    Ok(report)
}

fn print_report(r: &PushReport) {
    if r.already_complete {
        println!(
            "snapshot {} of volume {} is already complete on the secondary",
            r.snapshot, r.volume
        );
        return;
    }
    let base = r.base.map(|b| format!(" over {b}")).unwrap_or_default();
    println!(
        "pushed snapshot {}{base} ({}): {} of {} blocks sent ({} zero), {} resumed, {} on the wire in {:.2}s ({:.1} MB/s)",
        r.snapshot,
        r.mode,
        r.blocks_sent,
        r.blocks_planned,
        r.zero_blocks_sent,
        r.blocks_skipped,
        crate::human_bytes(r.wire_bytes_sent),
        r.seconds,
        r.mb_per_s
    );
    if let Some(h) = &r.blake3 {
        println!("image blake3 {h} checked by the secondary");
    }
}

fn print_listing(volumes: &[VolumeListing], json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(volumes)?);
        return Ok(());
    }
    if volumes.is_empty() {
        println!("no replicas");
    }
    for v in volumes {
        println!(
            "volume {} ({}, blocks of {})",
            v.volume,
            crate::human_bytes(v.size),
            crate::human_bytes(v.block_size as u64)
        );
        println!(
            "  {:>6}  {:>6}  {:>8}  {:>10}  BLAKE3",
            "ID", "BASE", "BLOCKS", "DATA"
        );
        for s in &v.snapshots {
            let base = s.base.map(|b| b.to_string()).unwrap_or_else(|| "-".into());
            println!(
                "  {:>6}  {:>6}  {:>8}  {:>10}  {}",
                s.id,
                base,
                s.blocks,
                crate::human_bytes(s.data_bytes),
                s.blake3
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- mount and identity

/// The volume to use: the one given, or the only one the store holds.
fn pick_volume(store: &ReplicaStore, volume: Option<String>) -> Result<String> {
    let dir = store.dir();
    Ok(match volume {
        Some(v) => v,
        None => {
            let all = store.volumes()?;
            match all.as_slice() {
                [one] => one.clone(),
                [] => bail!("{} holds no replica", dir.display()),
                many => bail!(
                    "{} holds {} volumes ({}); pick one with --volume",
                    dir.display(),
                    many.len(),
                    many.join(", ")
                ),
            }
        }
    })
}

fn mount_replica(dir: &Path, mnt: &Path, volume: Option<String>) -> Result<()> {
    let store = ReplicaStore::open(dir)?;
    let uuid = pick_volume(&store, volume)?;
    let source = store.volume(&uuid)?;
    let vfs = Arc::new(freezeframe_core::vfs::Vfs::new(Arc::new(source)));
    let handle = freezeframe_fusefs::mount(vfs, mnt, freezeframe_fusefs::MountConfig::default())?;
    eprintln!(
        "replica of volume {uuid} mounted read-only at {} (Ctrl-C or SIGTERM to unmount)",
        mnt.display()
    );
    runtime()?.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        anyhow::Ok(())
    })?;
    handle.unmount()?;
    Ok(())
}

/// Issues the secondary's certificate from CA_DIR's CA and writes OUT/replica.toml (returned).
pub fn init_identity(
    ca_dir: &Path,
    name: &str,
    out: &Path,
    listen: SocketAddr,
    allow: Vec<String>,
) -> Result<PathBuf> {
    let ca = ClusterCa::load(&ca_dir.join("ca.pem"), &ca_dir.join("ca.key"))
        .with_context(|| format!("loading the cluster CA from {}", ca_dir.display()))?;
    let allow = if allow.is_empty() {
        let (cf, _) = crate::cluster::load(ca_dir)
            .with_context(|| "no --allow given and no cluster.toml to take the node names from")?;
        cf.nodes
    } else {
        allow
    };
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let alt: Vec<String> = if listen.ip().is_unspecified() {
        Vec::new()
    } else {
        vec![listen.ip().to_string()]
    };
    let id = ca.issue_node(name, &alt)?;
    id.save(&out.join("node.pem"), &out.join("node.key"))?;
    ca.certificate().save(&out.join("ca.pem"))?;
    let file = ReplicaFile {
        replica: ReplicaSection {
            name: name.to_string(),
            listen,
        },
        tls: crate::config::TlsSection {
            cert: "node.pem".into(),
            key: "node.key".into(),
        },
        cluster: AllowSection {
            ca_cert: "ca.pem".into(),
            members: allow,
        },
    };
    let path = out.join("replica.toml");
    std::fs::write(&path, toml::to_string_pretty(&file)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}
