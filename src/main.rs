//! # freezeframe
//!
//! The one binary: the node daemon (`node run`), the cluster tools
//! (`cluster init|up|down`), the client commands that talk to a node's control
//! socket, the volume, backup and replica tools, the console and the benchmarks.
//!
//! Everything here translates between the world (flags, sockets, terminals)
//! and the libraries; decisions live in `freezeframe-core`.
//!
//! # Layout
//! - `config`: node.toml.
//! - `cluster`: a whole cluster on one host (init, up, down).
//! - `node`: the daemon and its drivers.
//! - `client`: status, snapshot and events commands.
//! - `demo_writer`: the checkable demo application.
//! - `replica`: snapshots kept on a secondary host (serve, push, list, mount).

mod bench;
mod cli;
mod client;
mod cluster;
mod config;
mod demo;
mod demo_writer;
mod node;
mod replica;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "freezeframe",
    version,
    about = "Cluster-wide application-consistent snapshots of a shared volume"
)]
struct Cli {
    /// The node to talk to (its node.toml).
    #[arg(long, global = true, env = "FREEZEFRAME_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a node daemon, or manage one.
    #[command(subcommand)]
    Node(NodeCmd),
    /// A cluster on this host: init, up, down.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// The whole story on this machine: a local cluster, applications writing,
    /// snapshots from every node, consistency checked on every mount.
    Demo {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Where to put the cluster (default: a temporary folder, removed afterwards).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Leave the cluster running and its folder in place.
        #[arg(long)]
        keep: bool,
        /// Open the desktop console on the running cluster.
        #[arg(long)]
        console: bool,
        /// How many snapshots to take.
        #[arg(long, default_value_t = 3)]
        snapshots: usize,
    },
    /// Shared volume with copy-on-write snapshots: create, write, snapshot, read, diff.
    Volume(cli::volume::VolumeArgs),
    /// Keep snapshots on a secondary host, sending only changed blocks.
    Replica(replica::ReplicaArgs),
    /// Benchmarks that print JSON.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// This node, its peers and writers.
    Status(Out),
    /// Cluster-wide snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Follow the phase events of this node (and those it hears from its peers).
    Events(Out),
    /// Open the desktop console on this node (FREEZEFRAME_CONSOLE_DEMO=1: on a recorded demo cluster).
    Console,
    /// Backups of this node's volume: init, run, list, restore, verify, forget, gc.
    Backup(cli::backup::BackupArgs),
    /// The demo application (a checkable writer); used by `demo` and the tests.
    #[command(hide = true)]
    DemoWriter(DemoWriterArgs),
    /// Checks one demo application's region of a snapshot image (JSON).
    #[command(hide = true)]
    DemoCheck {
        #[arg(long)]
        image: PathBuf,
        #[arg(long)]
        offset: u64,
        #[arg(long)]
        len: u64,
        #[arg(long)]
        name: String,
        /// The writer's freeze log and the snapshot to compare with.
        #[arg(long)]
        log: PathBuf,
        #[arg(long)]
        snapshot: u64,
    },
}

#[derive(Subcommand, Debug)]
enum NodeCmd {
    /// Run the daemon in the foreground until SIGTERM/SIGINT.
    Run,
    /// Fence a node off the volume (run against any live node): its live
    /// writes fail from now on and snapshots go on without it.
    Fence {
        /// The node to fence.
        name: String,
        /// Why, recorded with the fence and shown in every snapshot that excludes it.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        out: Out,
    },
    /// Lift a fence: the node writes again and takes part in the next snapshot.
    Unfence {
        /// The node to unfence.
        name: String,
        #[command(flatten)]
        out: Out,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// Create a cluster on this host: shared volume, CA, one folder per node.
    Init {
        dir: PathBuf,
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value = "1GiB")]
        size: String,
        #[arg(long, default_value = "64KiB")]
        block_size: String,
        /// Freeze lease of every node.
        #[arg(long, default_value = "10s")]
        lease: String,
        #[command(flatten)]
        out: Out,
    },
    /// Start every node of DIR in the background and wait until the mesh is connected.
    Up {
        dir: PathBuf,
        #[arg(long, default_value = "30s")]
        wait: String,
        #[command(flatten)]
        out: Out,
    },
    /// Stop every node of DIR cleanly.
    Down {
        dir: PathBuf,
        #[arg(long, default_value = "15s")]
        wait: String,
        #[command(flatten)]
        out: Out,
    },
}

#[derive(Subcommand, Debug)]
enum SnapshotCmd {
    /// Take a cluster-wide application-consistent snapshot with this node as initiator.
    Create {
        /// Give up (and abort everywhere) after this long.
        #[arg(long)]
        timeout: Option<String>,
        #[command(flatten)]
        out: Out,
    },
    List(Out),
    Show {
        id: u64,
        #[command(flatten)]
        out: Out,
    },
    Delete {
        id: u64,
        #[command(flatten)]
        out: Out,
    },
    /// Compute the blake3 hash of the snapshot image and record it in its manifest.
    Verify {
        id: u64,
        #[command(flatten)]
        out: Out,
        /// Print progress lines ({"progress":{…}}) on stderr for the console.
        #[arg(long)]
        progress: bool,
    },
}

/// Output format of a command.
#[derive(Args, Debug, Clone, Copy)]
struct Out {
    /// Print one JSON value for scripts instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct DemoWriterArgs {
    #[arg(long)]
    socket: PathBuf,
    #[arg(long)]
    volume: PathBuf,
    #[arg(long)]
    name: String,
    #[arg(long)]
    offset: u64,
    #[arg(long, default_value_t = 4 << 20)]
    len: u64,
    /// Where the writer records its freeze counts (JSON lines).
    #[arg(long)]
    log: PathBuf,
    #[arg(long, default_value = "2ms")]
    interval: String,
    #[arg(long)]
    veto: bool,
    #[arg(long)]
    silent: bool,
    /// How long the node waits for this writer's answer to freeze.
    #[arg(long, default_value = "5s")]
    freeze_timeout: String,
    /// Mark its region of the virtual snapshot during post-snapshot processing.
    #[arg(long)]
    post_mark: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dur(s: &str) -> Result<Duration> {
    Ok(Duration::from_millis(config::parse_ms(s)?))
}

fn run(cli: Cli) -> Result<ExitCode> {
    let cfg = || config::resolve(cli.config.as_deref());
    match cli.command {
        Command::Node(NodeCmd::Run) => node::run(cfg()?)?,
        Command::Node(NodeCmd::Fence {
            name,
            reason,
            out: Out { json },
        }) => client::node_fence(&cfg()?, &name, reason, json)?,
        Command::Node(NodeCmd::Unfence {
            name,
            out: Out { json },
        }) => client::node_unfence(&cfg()?, &name, json)?,
        Command::Demo {
            nodes,
            dir,
            keep,
            console,
            snapshots,
        } => {
            if !demo::run(demo::DemoOptions {
                nodes,
                dir,
                keep,
                console,
                snapshots,
            })? {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Volume(args) => cli::volume::run(args)?,
        Command::Bench(cmd) => bench::run(cmd)?,
        Command::Replica(args) => replica::run(args, cli.config.as_deref())?,
        Command::Cluster(ClusterCmd::Init {
            dir,
            nodes,
            size,
            block_size,
            lease,
            out: Out { json },
        }) => {
            let opts = cluster::InitOptions {
                nodes,
                size: freezeframe_core::units::parse_size(&size)?,
                block_size: u32::try_from(freezeframe_core::units::parse_size(&block_size)?)?,
                lease,
            };
            let configs = cluster::init(&dir, &opts)?;
            if json {
                println!("{}", serde_json::json!({ "dir": dir, "configs": configs }));
            } else {
                println!("cluster created in {}", dir.display());
                for c in configs {
                    println!("  {}", c.display());
                }
                println!("start it with: freezeframe cluster up {}", dir.display());
            }
        }
        Command::Cluster(ClusterCmd::Up {
            dir,
            wait,
            out: Out { json },
        }) => {
            cluster::up(&dir, dur(&wait)?)?;
            if !json {
                println!("cluster {} is up", dir.display());
            }
        }
        Command::Cluster(ClusterCmd::Down {
            dir,
            wait,
            out: Out { json },
        }) => {
            cluster::down(&dir, dur(&wait)?)?;
            if !json {
                println!("cluster {} is down", dir.display());
            }
        }
        Command::Status(Out { json }) => client::status(&cfg()?, json)?,
        Command::Snapshot(SnapshotCmd::Create {
            timeout,
            out: Out { json },
        }) => {
            let t = timeout.as_deref().map(config::parse_ms).transpose()?;
            if !client::snapshot_create(&cfg()?, t, json)? {
                return Ok(ExitCode::from(2));
            }
        }
        Command::Snapshot(SnapshotCmd::List(Out { json })) => client::snapshot_list(&cfg()?, json)?,
        Command::Snapshot(SnapshotCmd::Show {
            id,
            out: Out { json },
        }) => client::snapshot_show(&cfg()?, id, json)?,
        Command::Snapshot(SnapshotCmd::Delete {
            id,
            out: Out { json },
        }) => client::snapshot_delete(&cfg()?, id, json)?,
        Command::Snapshot(SnapshotCmd::Verify {
            id,
            out: Out { json },
            progress,
        }) => client::snapshot_verify(&cfg()?, id, json, progress)?,
        Command::Events(Out { json }) => client::events(&cfg()?, json)?,
        Command::Console => {
            let exe = std::env::current_exe()?;
            match cfg() {
                Ok(c) => {
                    // Verify and backup run as children of the console; they must find the same node.
                    std::env::set_var("FREEZEFRAME_CONFIG", &c.file);
                    freezeframe_gui::run(c.control_socket(), c.name().to_string(), exe)?
                }
                Err(_) if std::env::var_os(freezeframe_gui::DEMO_ENV).is_some() => {
                    freezeframe_gui::run(PathBuf::new(), "n1".into(), exe)?
                }
                Err(e) => return Err(e),
            }
        }
        Command::Backup(a) => return cli::backup::run(a, cli.config.as_deref()),
        Command::DemoWriter(a) => demo_writer::run(demo_writer::Options {
            socket: a.socket,
            volume: a.volume,
            name: a.name,
            offset: a.offset,
            len: a.len,
            log: a.log,
            interval: dur(&a.interval)?,
            veto: a.veto,
            silent: a.silent,
            freeze_timeout_ms: config::parse_ms(&a.freeze_timeout)?,
            post_mark: a.post_mark,
        })?,
        Command::DemoCheck {
            image,
            offset,
            len,
            name,
            log,
            snapshot,
        } => {
            let got = demo_writer::check_region(&image, offset, len, &name)?;
            let want = demo_writer::read_freeze_log(&log)?.get(&snapshot).copied();
            let consistent = want == Some(got.records) && got.problem.is_none();
            println!(
                "{}",
                serde_json::json!({
                    "records": got.records, "frozen_with": want, "problem": got.problem, "consistent": consistent,
                    "post_mark": got.post_mark
                })
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `1.5 GiB`-style sizes for people.
pub use freezeframe_core::units::human_size as human_bytes;
