//! Numbers and times for people: sizes in binary units, UTC clock times.
/// `1.5 GiB`-style sizes (the one formatter of the workspace, in core).
pub use freezeframe_core::units::human_size as bytes;

/// `2026-11-22 02:41:07 UTC` from milliseconds since the Unix epoch.
pub fn utc(ms: u64) -> String {
    format!("{} UTC", freezeframe_core::units::utc_seconds(ms))
}

/// Milliseconds as `12 ms` or `1.25 s`.
pub fn millis(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        format!("{:.2} s", ms as f64 / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_instants_format_as_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_795_313_600_123), "2026-11-22 02:13:20 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
    }

    #[test]
    fn sizes_and_durations_read_naturally() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1_048_576), "1.0 MiB");
        assert_eq!(millis(12), "12 ms");
        assert_eq!(millis(1250), "1.25 s");
    }
}
