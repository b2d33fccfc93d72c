//! # freezeframe-gui
