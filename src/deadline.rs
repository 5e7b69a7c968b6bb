//! Each device's deadline: when, if it stays silent, it goes offline.
//!
//! A deadline is `last_seen_at + offline_after`, with the device's own `offline_after`
//! chosen, first match wins, from: the setting an operator gave it (`PATCH
//! /api/v1/devices/{id}`), the heartbeat interval it declares times
//! `heartbeat.missed_beats`, the first `[[heartbeat.rules]]` entry whose labels the
//! device carries, and the fleet's `heartbeat.offline_after`. The store keeps the
//! deadline in the row, written with `last_seen_at`, so the offline check is one
//! indexed range over deadlines that costs what it finds. It keeps the matching rule's
//! `offline_after` in the row too (`rule_ms`), computed here whenever the device's
//! labels change, so the write path reads a column instead of matching labels in SQL.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::labels::Labels;

/// Shortest `offline_after` a device may be given, and shortest interval it may
/// declare: below a second, detection (checks every `check_interval`) cannot keep up.
pub const MIN: Duration = Duration::from_secs(1);
/// Longest `offline_after` a device may be given, and longest interval it may declare.
pub const MAX: Duration = Duration::from_secs(30 * 24 * 3600);

/// A label rule: devices carrying all of `labels` (and no `offline_after` or interval
/// of their own) go offline after `offline_after`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub labels: Labels,
    #[serde(with = "humantime_serde")]
    pub offline_after: Duration,
}

impl Rule {
    /// Whether a device with `labels` carries every label of the rule.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.labels
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
    }
}

/// The fleet's rules for devices that have no `offline_after` of their own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deadlines {
    /// `heartbeat.offline_after`: the last resort.
    pub default: Duration,
    /// `heartbeat.missed_beats`: a device that declares its interval goes offline
    /// after this many of its heartbeats are missing.
    pub missed_beats: u32,
    /// `heartbeat.rules`, in the configuration's order: the first that matches wins.
    pub rules: Vec<Rule>,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            default: Duration::from_secs(180),
            missed_beats: 3,
            rules: Vec::new(),
        }
    }
}

impl Deadlines {
    /// The `offline_after` of the first rule whose labels `labels` carries.
    pub fn rule(&self, labels: &Labels) -> Option<Duration> {
        self.rules
            .iter()
            .find(|rule| rule.matches(labels))
            .map(|rule| rule.offline_after)
    }

    /// A device's `offline_after`: its own setting, else its declared interval times
    /// `missed_beats`, else its label rule's (`rule`, from [`Self::rule`]), else the
    /// fleet's default.
    pub fn offline_after(
        &self,
        own: Option<Duration>,
        interval: Option<Duration>,
        rule: Option<Duration>,
    ) -> Duration {
        own.or_else(|| interval.map(|i| i.saturating_mul(self.missed_beats)))
            .or(rule)
            .unwrap_or(self.default)
    }

    /// When a device last seen at `seen` goes offline.
    pub fn deadline(
        &self,
        seen: Timestamp,
        own: Option<Duration>,
        interval: Option<Duration>,
        rule: Option<Duration>,
    ) -> Timestamp {
        seen.saturating_add(self.offline_after(own, interval, rule))
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

/// A duration as the API and heartbeats write it: whole seconds, minutes or hours,
/// `"30s"`, `"10m"`, `"2h"`, from 1 s to 30 days. Exactly what [`DURATION_PATTERN`]
/// matches, so the OpenAPI document says what is accepted.
pub fn parse_text(text: &str) -> Result<Duration, String> {
    let unit = match text.as_bytes().last() {
        Some(b's') => 1,
        Some(b'm') => 60,
        Some(b'h') => 3600,
        _ => {
            return Err(format!(
                "{text:?} is not a duration such as \"30s\", \"10m\" or \"2h\""
            ));
        }
    };
    let digits = &text[..text.len() - 1];
    if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "{text:?} is not a duration such as \"30s\", \"10m\" or \"2h\""
        ));
    }
    let count: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is too long"))?;
    bounded(Duration::from_secs(count.saturating_mul(unit))).map_err(|e| e.to_string())
}

/// [`parse_text`]'s grammar with its bounds, as a regular expression: 1 to 2,592,000
/// seconds, 1 to 43,200 minutes or 1 to 720 hours.
pub const DURATION_PATTERN: &str = concat!(
    "^(([1-9][0-9]{0,5}|1[0-9]{6}|2[0-4][0-9]{5}|25[0-8][0-9]{4}|259[01][0-9]{3}|2592000)s",
    "|([1-9][0-9]{0,3}|[1-3][0-9]{4}|4[0-2][0-9]{3}|43[01][0-9]{2}|43200)m",
    "|([1-9][0-9]?|[1-6][0-9]{2}|7[01][0-9]|720)h)$"
);

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
        rules: Vec::new(),
    };

    #[test]
    fn own_setting_beats_declared_interval_beats_label_rule_beats_fleet_default() {
        let own = Some(Duration::from_secs(20));
        let interval = Some(Duration::from_secs(5));
        let rule = Some(Duration::from_secs(7200));
        assert_eq!(
            FLEET.offline_after(own, interval, rule),
            Duration::from_secs(20)
        );
        assert_eq!(
            FLEET.offline_after(None, interval, rule),
            Duration::from_secs(15)
        );
        assert_eq!(
            FLEET.offline_after(None, None, rule),
            Duration::from_secs(7200)
        );
        assert_eq!(
            FLEET.offline_after(None, None, None),
            Duration::from_secs(180)
        );
    }

    #[test]
    fn the_first_rule_whose_labels_a_device_carries_wins() {
        let fleet = Deadlines {
            rules: vec![
                Rule {
                    labels: Labels::of(&[("kind", "sensor"), ("site", "north")]),
                    offline_after: Duration::from_secs(600),
                },
                Rule {
                    labels: Labels::of(&[("kind", "sensor")]),
                    offline_after: Duration::from_secs(7200),
                },
            ],
            ..FLEET
        };
        let north = Labels::of(&[("kind", "sensor"), ("site", "north"), ("floor", "2")]);
        assert_eq!(fleet.rule(&north), Some(Duration::from_secs(600)));
        let south = Labels::of(&[("kind", "sensor"), ("site", "south")]);
        assert_eq!(fleet.rule(&south), Some(Duration::from_secs(7200)));
        assert_eq!(fleet.rule(&Labels::of(&[("kind", "pump")])), None);
        assert_eq!(fleet.rule(&Labels::default()), None);
    }

    #[test]
    fn a_deadline_is_last_seen_plus_offline_after() {
        let seen = Timestamp::from_unix_millis(1_000);
        assert_eq!(
            FLEET.deadline(seen, None, Some(Duration::from_millis(1_500)), None),
            Timestamp::from_unix_millis(5_500)
        );
    }

    #[test]
    fn durations_are_whole_seconds_minutes_or_hours_within_the_bounds() {
        assert_eq!(parse_text("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_text("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_text("720h"), Ok(MAX));
        for bad in [
            "", "s", "0s", "05s", "1.5s", "1d", "2h30m", " 5s", "721h", "43201m",
        ] {
            assert!(parse_text(bad).is_err(), "{bad:?}");
        }
    }

    /// The pattern the OpenAPI document states accepts exactly what the parser does,
    /// checked at every boundary and across the whole range of each unit.
    #[test]
    fn the_documented_pattern_matches_exactly_what_is_parsed() {
        let pattern = regex::Regex::new(DURATION_PATTERN).expect("pattern");
        let mut cases: Vec<String> = ["", "0s", "05s", "1d", "s", "7200m0", "2592001s"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for (unit, max) in [("s", 2_592_000u64), ("m", 43_200), ("h", 720)] {
            for n in (0..=max + 2)
                .step_by(997)
                .chain([0, 1, 9, 10, max - 1, max, max + 1])
            {
                cases.push(format!("{n}{unit}"));
            }
        }
        for case in cases {
            assert_eq!(
                pattern.is_match(&case),
                parse_text(&case).is_ok(),
                "{case:?}"
            );
        }
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
