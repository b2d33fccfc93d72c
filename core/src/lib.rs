//! # freezeframe-core
//!
//! The engine of freezeframe. Nothing in this crate opens a socket, mounts a
//! filesystem or reads a clock on its own behalf: the protocol machines take
//! time as an argument and return instructions; the volume engine does file
//! I/O on the shared volume and its state directory only.
//!
//! # Layout
//! - [`error`]: the crate's one error type.
//! - [`backup`]: the deduplicating backup repository (express-full backups).

pub mod backup;
pub mod error;

pub use error::{Error, Result};
