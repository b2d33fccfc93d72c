//! # freezeframe-netproto
