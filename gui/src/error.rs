//! The console's one error type. Messages say what failed and where (which
//! socket, which node, which snapshot), because they are shown as they are in
//! the window's banner.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The control socket cannot be reached (the node is down or the path is wrong).
    #[error("cannot connect to {path}: {source}")]
    Connect { path: PathBuf, source: std::io::Error },
    /// The connection broke while talking to the node.
    #[error("connection to {path} lost while {doing}: {source}")]
    Io { path: PathBuf, doing: &'static str, source: std::io::Error },
    /// The node hung up before answering.
    #[error("{path} closed the connection while {doing}")]
    Closed { path: PathBuf, doing: &'static str },
    /// The node answered `{"ok":false,"error":…}`.
    #[error("{0}")]
    Remote(String),
    /// An answer or an event the console cannot read.
    #[error("the node's answer to {what} is malformed: {detail}")]
    Malformed { what: &'static str, detail: String },
    /// A line longer than the protocol allows.
    #[error("{path} sent a line longer than {max} bytes")]
    LineTooLong { path: PathBuf, max: usize },
    /// A long operation's child process could not be started or failed.
    #[error("{what}: {detail}")]
    Job { what: String, detail: String },
    /// The background runtime could not be started.
    #[error("cannot start the console's background runtime: {0}")]
    Runtime(std::io::Error),
    /// eframe could not open the window.
    #[error("cannot open the console window: {0}")]
    Window(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
