//! # freezeframe
//!
//! The one binary: the node daemon (`node run`), the cluster tools
//! (`cluster init|up|down`), the client commands that talk to a node's control
//! socket, the volume, backup and replica tools, the console and the benchmarks.
//!
//! Everything here translates between the world (flags, sockets, terminals)
//! and the libraries; decisions live in `freezeframe-core`.

use clap::{Parser, Subcommand};

mod bench;
mod cli;

#[derive(Parser, Debug)]
#[command(name = "freezeframe", version, about = "Cluster-wide application-consistent snapshots of a shared volume")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Shared volume with copy-on-write snapshots: create, write, snapshot, read, diff.
    Volume(cli::volume::VolumeArgs),
    /// Benchmarks that print JSON.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Volume(args) => cli::volume::run(args),
        Command::Bench(cmd) => bench::run(cmd),
    }
}
