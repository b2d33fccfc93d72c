//! `freezeframe bench …`: benchmarks as commands that print JSON with the
//! ratio to a peer measured in the same run (never timed assertions in tests).

use clap::Subcommand;

pub mod replica;
pub mod volume;

/// The benchmarks.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Copy-on-write cost of the volume engine and snapshot create time.
    Volume(volume::BenchVolumeArgs),
    /// Full and incremental replica push over loopback, beside rsync and a plain TCP copy.
    Replica(replica::BenchReplicaArgs),
}

/// Runs one benchmark.
pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Volume(args) => volume::run(args),
        BenchCommand::Replica(args) => replica::run(args),
    }
}
