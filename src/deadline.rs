//! Each device's deadline: when, if it stays silent, it goes offline.
//!
//! A deadline is `last_seen_at + offline_after`, with the device's own `offline_after`
//! chosen, first match wins, from: the setting an operator gave it (`PATCH
//! /api/v1/devices/{id}`), the heartbeat interval it declares times
//! `heartbeat.missed_beats`, and the fleet's `heartbeat.offline_after`. The store
//! keeps the deadline in the row, written with `last_seen_at`, so the offline check is
//! one indexed range over deadlines that costs what it finds.

use std::time::Duration;

use crate::clock::Timestamp;

/// Shortest `offline_after` a device may be given, and shortest interval it may
/// declare: below a second, detection (checks every `check_interval`) cannot keep up.
pub const MIN: Duration = Duration::from_secs(1);
/// Longest `offline_after` a device may be given, and longest interval it may declare.
pub const MAX: Duration = Duration::from_secs(30 * 24 * 3600);

/// The fleet's rules for devices that have no `offline_after` of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// `heartbeat.offline_after`: the last resort.
    pub default: Duration,
    /// `heartbeat.missed_beats`: a device that declares its interval goes offline
    /// after this many of its heartbeats are missing.
    pub missed_beats: u32,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            default: Duration::from_secs(180),
            missed_beats: 3,
        }
    }
}

impl Deadlines {
    /// A device's `offline_after`: its own setting, else its declared interval times
    /// `missed_beats`, else the fleet's default.
    pub fn offline_after(&self, own: Option<Duration>, interval: Option<Duration>) -> Duration {
        own.or_else(|| interval.map(|i| i.saturating_mul(self.missed_beats)))
            .unwrap_or(self.default)
    }

    /// When a device last seen at `seen` goes offline.
    pub fn deadline(
        &self,
        seen: Timestamp,
        own: Option<Duration>,
        interval: Option<Duration>,
    ) -> Timestamp {
        seen.saturating_add(self.offline_after(own, interval))
    }

    /// `default` in milliseconds, as the stores bind it.
    pub fn default_ms(&self) -> i64 {
        millis(self.default)
    }

    pub fn missed_beats_i64(&self) -> i64 {
        i64::from(self.missed_beats)
    }
}

/// A duration as whole milliseconds, as stored.
pub fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A stored millisecond count as a duration (a negative one, which no write makes,
/// reads as zero).
pub fn from_millis(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// Why a duration cannot be a device's `offline_after` or interval.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("must be between 1s and 30days, not {}", humantime::format_duration(*.0))]
pub struct OutOfRange(pub Duration);

/// `d` if it lies within [`MIN`]..=[`MAX`].
pub fn bounded(d: Duration) -> Result<Duration, OutOfRange> {
    if (MIN..=MAX).contains(&d) {
        Ok(d)
    } else {
        Err(OutOfRange(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLEET: Deadlines = Deadlines {
        default: Duration::from_secs(180),
        missed_beats: 3,
    };

    #[test]
    fn own_setting_beats_declared_interval_beats_fleet_default() {
        let own = Some(Duration::from_secs(20));
        let interval = Some(Duration::from_secs(5));
        assert_eq!(FLEET.offline_after(own, interval), Duration::from_secs(20));
        assert_eq!(FLEET.offline_after(None, interval), Duration::from_secs(15));
        assert_eq!(FLEET.offline_after(None, None), Duration::from_secs(180));
    }

    #[test]
    fn a_deadline_is_last_seen_plus_offline_after() {
        let seen = Timestamp::from_unix_millis(1_000);
        assert_eq!(
            FLEET.deadline(seen, None, Some(Duration::from_millis(1_500))),
            Timestamp::from_unix_millis(5_500)
        );
    }

    #[test]
    fn bounds_refuse_zero_and_more_than_thirty_days() {
        assert!(bounded(Duration::ZERO).is_err());
        assert!(bounded(Duration::from_millis(999)).is_err());
        assert_eq!(bounded(MIN), Ok(MIN));
        assert_eq!(bounded(MAX), Ok(MAX));
        let err = bounded(MAX + Duration::from_secs(1)).expect_err("too long");
        assert_eq!(
            err.to_string(),
            "must be between 1s and 30days, not 30days 1s"
        );
    }
}
