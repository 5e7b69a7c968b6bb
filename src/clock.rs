//! The hub's clock. Every `last_seen_at`, deadline and `changed_at` comes from here,
//! never from a device.
//!
//! [`Clock`] reads wall time once, at start, and advances it with tokio's monotonic
//! clock. Two things follow: timestamps never run backwards when NTP steps the system
//! clock (a step backwards could otherwise make a healthy device look silent), and
//! tests drive the hub's notion of time with `tokio::time::pause()`/`advance()`.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use tokio::time::Instant;

/// A point in time as Unix milliseconds (UTC): compact to store and compare, and what
/// the SQLite store keeps in its INTEGER columns.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    pub const fn from_unix_millis(ms: i64) -> Self {
        Self(ms)
    }

    pub const fn unix_millis(self) -> i64 {
        self.0
    }

    pub fn from_datetime(dt: DateTime<Utc>) -> Self {
        Self(dt.timestamp_millis())
    }

    pub fn to_datetime(self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.0).unwrap_or(DateTime::<Utc>::MIN_UTC)
    }

    /// RFC 3339 in UTC with millisecond precision, e.g. `2026-11-22T10:03:00.000Z`.
    pub fn to_rfc3339(self) -> String {
        self.to_datetime()
            .to_rfc3339_opts(SecondsFormat::Millis, true)
    }

    pub fn parse_rfc3339(text: &str) -> Result<Self, chrono::ParseError> {
        DateTime::parse_from_rfc3339(text).map(|dt| Self::from_datetime(dt.with_timezone(&Utc)))
    }

    pub fn saturating_sub(self, d: Duration) -> Self {
        Self(self.0.saturating_sub(duration_millis(d)))
    }

    pub fn saturating_add(self, d: Duration) -> Self {
        Self(self.0.saturating_add(duration_millis(d)))
    }

    /// Signed distance `self - earlier` in milliseconds.
    pub fn millis_since(self, earlier: Timestamp) -> i64 {
        self.0.saturating_sub(earlier.0)
    }
}

fn duration_millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.to_rfc3339())
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_rfc3339())
    }
}

impl utoipa::PartialSchema for Timestamp {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
            .examples(["2026-11-22T10:03:00.000Z"])
            .into()
    }
}

impl utoipa::ToSchema for Timestamp {}

impl serde::Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_rfc3339())
    }
}

impl<'de> serde::Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Self::parse_rfc3339(&text).map_err(serde::de::Error::custom)
    }
}

/// Wall time anchored at creation and advanced by tokio's monotonic clock.
///
/// A clock made by [`Clock::new`] also follows the system clock when it is *set*:
/// [`Clock::resync`] notices a step (a machine that booted without a real-time clock
/// and synced NTP after the hub started, an operator's `date -s`) and re-anchors.
#[derive(Clone, Debug)]
pub struct Clock {
    inner: Arc<Anchor>,
}

#[derive(Debug)]
struct Anchor {
    origin_wall: Timestamp,
    origin: Instant,
    /// Added to every reading: the sum of the steps `resync` has taken.
    offset_ms: AtomicI64,
    follows_system: bool,
}

/// A difference from the system clock larger than this is a step, not drift.
const STEP_MS: i64 = 1_000;

impl Clock {
    pub fn new() -> Self {
        Self::anchored(Timestamp::from_datetime(Utc::now()), true)
    }

    /// A clock that reads `start` now and never follows the system clock; for tests
    /// that pin the calendar and drive time with `tokio::time`.
    pub fn starting_at(start: Timestamp) -> Self {
        Self::anchored(start, false)
    }

    fn anchored(start: Timestamp, follows_system: bool) -> Self {
        Self {
            inner: Arc::new(Anchor {
                origin_wall: start,
                origin: Instant::now(),
                offset_ms: AtomicI64::new(0),
                follows_system,
            }),
        }
    }

    pub fn now(&self) -> Timestamp {
        let anchor = &self.inner;
        let base = anchor.origin_wall.saturating_add(anchor.origin.elapsed());
        Timestamp(base.0.saturating_add(anchor.offset_ms.load(Relaxed)))
    }

    /// Re-anchors on the system clock if it was set since the last look. Returns the
    /// step in milliseconds (positive: forward), or `None` if there was none.
    pub fn resync(&self) -> Option<i64> {
        if !self.inner.follows_system {
            return None;
        }
        let system = Timestamp::from_datetime(Utc::now());
        let step = system.millis_since(self.now());
        if step.abs() <= STEP_MS {
            return None;
        }
        self.inner.offset_ms.fetch_add(step, Relaxed);
        Some(step)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trip_keeps_milliseconds() {
        let t = Timestamp::parse_rfc3339("2026-11-22T10:03:00.123+01:00").expect("valid");
        assert_eq!(t.to_rfc3339(), "2026-11-22T09:03:00.123Z");
        assert_eq!(Timestamp::parse_rfc3339(&t.to_rfc3339()).ok(), Some(t));
    }

    #[tokio::test(start_paused = true)]
    async fn clock_follows_tokio_time() {
        let start = Timestamp::from_unix_millis(1_000_000);
        let clock = Clock::starting_at(start);
        tokio::time::advance(Duration::from_secs(180)).await;
        assert_eq!(clock.now(), Timestamp::from_unix_millis(1_180_000));
        assert_eq!(
            clock.resync(),
            None,
            "a pinned clock never follows the system"
        );
    }

    #[test]
    fn a_clock_that_was_set_is_followed_after_resync() {
        // A hub started while the system clock said 1970.
        let clock = Clock::anchored(Timestamp::from_unix_millis(0), true);
        let clones = clock.clone();
        let step = clock.resync().expect("a step of decades");
        assert!(step > 1_000_000_000_000, "{step}");
        let system = Timestamp::from_datetime(Utc::now());
        assert!(
            clones.now().millis_since(system).abs() < 1_000,
            "clones share the anchor"
        );
        assert_eq!(clock.resync(), None, "in step now");
    }
}
