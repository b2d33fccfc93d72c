//! # freezeframe-fusefs
