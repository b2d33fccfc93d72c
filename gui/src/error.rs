//! The console's one error type. Messages say what failed and where (which
//! socket, which node, which snapshot), because they are shown as they are in
//! the window's banner.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Talking to the node's control socket failed: unreachable, closed,
    /// a refused request (`{"ok":false}`), or a line over the limit.
    #[error(transparent)]
    Control(#[from] freezeframe_netproto::Error),
    /// The node did not answer a request in time (a hung daemon must not freeze the console's view).
    #[error("the node did not answer {what} within {ms} ms")]
    Timeout { what: &'static str, ms: u64 },
    /// An answer or an event the console cannot read.
    #[error("the node's answer to {what} is malformed: {detail}")]
    Malformed { what: &'static str, detail: String },
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
