//! Sizes and durations as people write them: `64KiB`, `1GiB`, `4096`, `10s`.
//!
//! Binary suffixes (KiB, MiB, GiB, TiB) are powers of 1024; the decimal ones
//! (KB, MB, GB, TB) powers of 1000, as an operator reading `df -H` expects.
//! Anything else is refused with the input quoted.

use std::time::Duration;

use crate::error::{Error, Result};

const SUFFIXES: &[(&str, u64)] = &[
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("TiB", 1 << 40),
    ("PiB", 1 << 50),
    ("KB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
    ("TB", 1_000_000_000_000),
    ("K", 1 << 10),
    ("M", 1 << 20),
    ("G", 1 << 30),
    ("T", 1 << 40),
    ("B", 1),
];

/// Smallest and largest volume block size.
pub const MIN_BLOCK_SIZE: u32 = 4 << 10;
/// Largest volume block size.
pub const MAX_BLOCK_SIZE: u32 = 1 << 20;

/// Splits `"64 KiB"` into its whole number and its (trimmed) unit; the error
/// says what is wrong, in `expected` when there is no number at all.
fn split_number<'a>(
    input: &'a str,
    expected: &'static str,
) -> std::result::Result<(u64, &'a str), &'static str> {
    let s = input.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(digits_end);
    if num.is_empty() {
        return Err(expected);
    }
    let n = num.parse().map_err(|_| "number too large")?;
    Ok((n, unit.trim()))
}

/// Parses a byte count: a whole number with an optional unit suffix.
pub fn parse_size(input: &str) -> Result<u64> {
    let bad = |why: &str| Error::InvalidSize {
        input: input.to_string(),
        why: why.to_string(),
    };
    let (n, unit) =
        split_number(input, "expected a whole number such as 4096, 64KiB or 1GiB").map_err(bad)?;
    let mult = if unit.is_empty() {
        1
    } else {
        SUFFIXES
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(unit))
            .map(|(_, m)| *m)
            .ok_or_else(|| bad("unknown unit (use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB)"))?
    };
    n.checked_mul(mult)
        .ok_or_else(|| bad("size overflows 64 bits"))
}

/// Parses a volume block size: a power of two from 4 KiB to 1 MiB.
pub fn parse_block_size(input: &str) -> Result<u32> {
    let n = parse_size(input)?;
    check_block_size(n).map_err(|why| Error::InvalidSize {
        input: input.to_string(),
        why,
    })
}

/// Checks that `n` is a usable block size; the error says why not.
pub fn check_block_size(n: u64) -> std::result::Result<u32, String> {
    if n < MIN_BLOCK_SIZE as u64 || n > MAX_BLOCK_SIZE as u64 || !n.is_power_of_two() {
        return Err(format!(
            "block size must be a power of two from 4KiB to 1MiB, not {n} bytes"
        ));
    }
    Ok(n as u32)
}

/// Formats a byte count with the largest binary unit that divides it exactly.
pub fn format_size(n: u64) -> String {
    for (name, mult) in [
        ("TiB", 1u64 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ] {
        if n >= mult && n.checked_rem(mult) == Some(0) {
            return format!("{}{name}", n / mult);
        }
    }
    format!("{n}B")
}

/// A byte count for people: `1.5 GiB`, `960.0 KiB`, `12 B`.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) from milliseconds since the Unix epoch: the one
/// clock-time formatter of the workspace (CLI, backup listings, console).
pub fn utc_seconds(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Parses a duration: a whole number with `ms`, `s`, `m` or `h` (seconds if bare).
pub fn parse_duration(input: &str) -> Result<Duration> {
    let bad = |why: &str| Error::InvalidDuration {
        input: input.to_string(),
        why: why.to_string(),
    };
    let (n, unit) =
        split_number(input, "expected a whole number such as 500ms, 10s or 2m").map_err(bad)?;
    let ms = match unit {
        "ms" => Some(n),
        "" | "s" => n.checked_mul(1000),
        "m" | "min" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(bad("unknown unit (use ms, s, m or h)")),
    };
    ms.map(Duration::from_millis)
        .ok_or_else(|| bad("duration overflows"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_as_operators_write_them() {
        assert_eq!(parse_size("4096").ok(), Some(4096));
        assert_eq!(parse_size("64KiB").ok(), Some(65536));
        assert_eq!(parse_size("1GiB").ok(), Some(1 << 30));
        assert_eq!(parse_size("1TiB").ok(), Some(1 << 40));
        assert_eq!(parse_size("2mib").ok(), Some(2 << 20));
        assert_eq!(parse_size("1GB").ok(), Some(1_000_000_000));
    }

    #[test]
    fn bad_sizes_are_refused_with_the_input_quoted() {
        for bad in [
            "",
            "GiB",
            "12XB",
            "-5",
            "1.5GiB",
            "99999999999999999999",
            "16777216TiB",
        ] {
            let err = parse_size(bad).expect_err(bad).to_string();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn block_size_must_be_a_power_of_two_between_4k_and_1m() {
        assert_eq!(parse_block_size("64KiB").ok(), Some(65536));
        assert_eq!(parse_block_size("4KiB").ok(), Some(4096));
        assert_eq!(parse_block_size("1MiB").ok(), Some(1 << 20));
        for bad in ["2KiB", "2MiB", "48KiB", "0"] {
            assert!(parse_block_size(bad)
                .expect_err(bad)
                .to_string()
                .contains("power of two"));
        }
    }

    #[test]
    fn sizes_format_back_to_their_unit() {
        assert_eq!(format_size(1 << 30), "1GiB");
        assert_eq!(format_size(65536), "64KiB");
        assert_eq!(format_size(1000), "1000B");
    }

    #[test]
    fn durations_parse() {
        assert_eq!(
            parse_duration("500ms").ok(),
            Some(Duration::from_millis(500))
        );
        assert_eq!(parse_duration("10s").ok(), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m").ok(), Some(Duration::from_secs(120)));
        assert!(parse_duration("soon").is_err());
    }
}
