//! Error type of freezeframe-core.
