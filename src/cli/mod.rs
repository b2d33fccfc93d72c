//! Command-line front ends: each module parses flags, calls the core library
//! and prints; no decision is made here.

pub mod backup;
pub mod volume;
