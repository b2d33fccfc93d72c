//! # freezeframe
//!
//! The one binary: the node daemon (`node run`), the cluster tools
//! (`cluster init|up|down`), the client commands that talk to a node's control
//! socket, the volume, backup and replica tools, the console and the benchmarks.
//!
//! Everything here translates between the world (flags, sockets, terminals)
//! and the libraries; decisions live in `freezeframe-core`.

use clap::{Parser, Subcommand};

mod bench {
    pub mod mount;
}

#[derive(Parser, Debug)]
#[command(name = "freezeframe", version, about = "Cluster-wide application-consistent snapshots of a shared volume")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Benchmarks that print JSON with the ratio to a peer measured in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Snapshot reads through the FUSE mount against bindfs over a plain copy.
    Mount(bench::mount::Args),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Bench(BenchCommand::Mount(args)) => bench::mount::run(&args),
    }
}
