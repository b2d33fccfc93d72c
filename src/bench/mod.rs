//! `freezeframe bench …`: benchmarks as commands that print JSON with the
//! ratio to a peer measured in the same run (never timed assertions in tests).

use clap::Subcommand;

pub mod backup;

/// The benchmarks.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Express-full backups against restic and borg on the same volume.
    Backup(backup::BenchBackupArgs),
}

/// Runs one benchmark.
pub fn run(cmd: BenchCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Backup(args) => backup::run(args, json),
    }
}
