//! `freezeframe bench …`: benchmarks as commands that print JSON with the
//! ratio to a peer measured in the same run (never timed assertions in tests).
//! Every peer's result is checked after its run ([`peers`]); `bench all` runs them
//! all and prints one summary table.

use clap::Subcommand;

pub mod all;
pub mod backup;
pub mod fault_writer;
pub mod faults;
pub mod mount;
pub mod peers;
pub mod replica;
pub mod snapshot;
pub mod volume;

/// The benchmarks.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Every benchmark with its peers in one go, and one summary table (or JSON).
    All(all::BenchAllArgs),
    /// Copy-on-write cost of the volume engine and snapshot create time.
    Volume(volume::BenchVolumeArgs),
    /// Snapshot reads through the FUSE mount against bindfs over a plain copy, live writes.
    Mount(mount::Args),
    /// Freeze window, I/O hold and phase times of cluster-wide snapshots.
    Snapshot(snapshot::BenchSnapshotArgs),
    /// Express-full backups against restic and borg on the same volume.
    Backup(backup::BenchBackupArgs),
    /// Full and incremental replica push over loopback, beside rsync and a plain TCP copy.
    Replica(replica::BenchReplicaArgs),
    /// The fault matrix: node role × phase × fault, each on a fresh 3-node cluster.
    Faults(faults::Args),
    /// The writer the fault matrix runs on every node.
    #[command(hide = true)]
    FaultWriter(fault_writer::Args),
}

/// Runs one benchmark.
pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::All(args) => all::run(args),
        BenchCommand::Volume(args) => volume::run(args),
        BenchCommand::Mount(args) => mount::run(&args),
        BenchCommand::Snapshot(args) => snapshot::run(args),
        BenchCommand::Backup(args) => backup::run(args),
        BenchCommand::Replica(args) => replica::run(args),
        BenchCommand::Faults(args) => faults::run(args),
        BenchCommand::FaultWriter(args) => fault_writer::run(args),
    }
}
