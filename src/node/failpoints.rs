//! Fault injection for the fault-matrix tests: delays that stretch a phase
//! so that a fault can be injected while a node is in it.
//!
//! Read once at start from `FREEZEFRAME_FAILPOINTS`, a comma-separated list
//! of `name=value`; unset means none. Unknown names or bad values are a
//! startup error, so a mistyped failpoint never silently does nothing.
//!
//! | name | effect |
//! |---|---|
//! | `create_delay_ms=N` | the initiator waits N ms before creating the block snapshot (stretches `committing`) |
//! | `seal_delay_ms=N` | the initiator waits N ms before sealing (stretches `thawing`) |
//! | `hold_delay_ms=N` | every node waits N ms before taking its I/O hold |

use std::time::Duration;

use anyhow::{bail, Context, Result};

/// The variable the failpoints are read from.
pub const ENV: &str = "FREEZEFRAME_FAILPOINTS";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Failpoints {
    pub create_delay: Duration,
    pub seal_delay: Duration,
    pub hold_delay: Duration,
}

impl Failpoints {
    pub fn from_env() -> Result<Failpoints> {
        match std::env::var(ENV) {
            Ok(s) => Failpoints::parse(&s).with_context(|| format!("{ENV}={s:?}")),
            Err(_) => Ok(Failpoints::default()),
        }
    }

    pub fn parse(s: &str) -> Result<Failpoints> {
        let mut f = Failpoints::default();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let Some((name, value)) = item.split_once('=') else {
                bail!("failpoint {item:?} is not name=value");
            };
            let ms: u64 = value
                .trim()
                .parse()
                .with_context(|| format!("failpoint {name}: {value:?} is not a number of ms"))?;
            let d = Duration::from_millis(ms);
            match name.trim() {
                "create_delay_ms" => f.create_delay = d,
                "seal_delay_ms" => f.seal_delay = d,
                "hold_delay_ms" => f.hold_delay = d,
                other => bail!(
                    "unknown failpoint {other:?} (known: create_delay_ms, seal_delay_ms, hold_delay_ms)"
                ),
            }
        }
        Ok(f)
    }

    pub fn any(&self) -> bool {
        *self != Failpoints::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_failpoints_and_refuses_unknown_ones() {
        let f = Failpoints::parse("create_delay_ms=1500, seal_delay_ms=20").unwrap();
        assert_eq!(f.create_delay, Duration::from_millis(1500));
        assert_eq!(f.seal_delay, Duration::from_millis(20));
        assert_eq!(f.hold_delay, Duration::ZERO);
        let e = Failpoints::parse("create_dealy_ms=5")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown failpoint"), "{e}");
        assert!(Failpoints::parse("create_delay_ms=soon").is_err());
        assert!(Failpoints::parse("").unwrap() == Failpoints::default());
    }
}
