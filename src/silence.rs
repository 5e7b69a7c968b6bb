//! Silences (maintenance windows): an operator's statement that some devices are
//! expected to misbehave for a while, so nobody should be told about it
//! (interface.md "Silences").
//!
//! A silence names its devices one way: a list of ids, an id pattern (the sinks'
//! `filter.devices` glob: `*` any run, `?` one character) or labels (a device
//! carrying every one of them). It covers them from `starts_at` up to, not
//! including, `ends_at`. Silencing changes nothing the hub records or publishes: the
//! alert policy ([`crate::notify`]) asks [`Silence::covers`] whether to hold a
//! device's notifications, and the API shows `silenced_until` on each device.
//!
//! This module owns the shapes and the checks; the store keeps the rows
//! ([`crate::storage::Store::create_silence`] and its siblings).

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::device::DeviceId;
use crate::labels::Labels;
use crate::notify::filter::Glob;

/// Most ids one silence may list: enough for a site's devices, small enough that a
/// silence is read in one cheap query on every pass of the alert policy.
pub const MAX_DEVICE_IDS: usize = 10_000;
/// Longest comment, in characters.
pub const MAX_COMMENT: usize = 1_000;
/// Longest id pattern, in characters (an id has at most 128).
pub const MAX_PATTERN: usize = 256;
/// An id pattern, as the OpenAPI document states it: id characters and the
/// wildcards, exactly what [`IdPattern::parse`] takes.
pub const PATTERN_PATTERN: &str = r"^[A-Za-z0-9_.:*?-]{1,256}$";

/// A stored silence.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Silence {
    /// The store's number for it, for `DELETE /api/v1/silences/{id}`.
    #[schema(example = 7)]
    pub id: i64,
    /// Which devices: exactly one of `device_ids`, `pattern` or `labels`.
    #[serde(flatten)]
    pub matcher: SilenceMatcher,
    /// Covered from this instant...
    pub starts_at: Timestamp,
    /// ...up to this one, not included. Expiring a silence early moves it to then.
    pub ends_at: Timestamp,
    /// Why, for the people reading the list.
    #[schema(example = "firmware roll-out, north site")]
    pub comment: Option<String>,
    pub created_at: Timestamp,
}

/// Which devices a silence names.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub enum SilenceMatcher {
    /// These devices, sorted and without duplicates (make it with
    /// [`SilenceMatcher::devices`]), so a lookup is a binary search.
    #[serde(rename = "device_ids")]
    Devices(Vec<DeviceId>),
    /// Devices whose id matches the pattern.
    #[serde(rename = "pattern")]
    Pattern(IdPattern),
    /// Devices carrying every one of these labels (others they carry do not matter).
    #[serde(rename = "labels")]
    Labels(Labels),
}

impl SilenceMatcher {
    /// A list of devices, sorted and deduplicated as [`SilenceMatcher::Devices`]
    /// needs.
    pub fn devices(mut ids: Vec<DeviceId>) -> Self {
        ids.sort_unstable();
        ids.dedup();
        Self::Devices(ids)
    }

    pub fn matches(&self, device: &DeviceId, labels: &Labels) -> bool {
        match self {
            Self::Devices(ids) => ids.binary_search(device).is_ok(),
            Self::Pattern(pattern) => pattern.matches(device),
            Self::Labels(wanted) => wanted
                .iter()
                .all(|(key, value)| labels.get(key) == Some(value)),
        }
    }
}

impl Silence {
    /// Whether the silence names `device` (carrying `labels`), whatever the time.
    pub fn matches(&self, device: &DeviceId, labels: &Labels) -> bool {
        self.matcher.matches(device, labels)
    }

    /// Whether `device` is silenced by this at `at`: `starts_at <= at < ends_at`
    /// and the silence names it.
    pub fn covers(&self, device: &DeviceId, labels: &Labels, at: Timestamp) -> bool {
        self.starts_at <= at && at < self.ends_at && self.matches(device, labels)
    }
}

/// The latest `ends_at` of the `silences` covering `device` at `at`: until when it is
/// silenced (`None`: it is not). What the API shows as a device's `silenced_until`.
pub fn silenced_until<'a>(
    silences: impl IntoIterator<Item = &'a Silence>,
    device: &DeviceId,
    labels: &Labels,
    at: Timestamp,
) -> Option<Timestamp> {
    silences
        .into_iter()
        .filter(|silence| silence.covers(device, labels, at))
        .map(|silence| silence.ends_at)
        .max()
}

/// A device-id pattern, as a silence keeps it: the text it was given and the
/// [`Glob`] that matches it (the same syntax as a sink's `filter.devices`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdPattern {
    text: String,
    glob: Glob,
}

impl IdPattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.len() > MAX_PATTERN {
            return Err(format!(
                "is {} characters, over the limit of {MAX_PATTERN}",
                text.len()
            ));
        }
        Ok(Self {
            glob: Glob::parse(text)?,
            text: text.to_string(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn matches(&self, device: &DeviceId) -> bool {
        self.glob.matches(device)
    }
}

impl Serialize for IdPattern {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl utoipa::PartialSchema for IdPattern {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(PATTERN_PATTERN))
            .description(Some("`*` any run of characters, `?` one character"))
            .examples(["pump-*"])
            .into()
    }
}

impl utoipa::ToSchema for IdPattern {}

/// A silence to create, checked ([`NewSilence::parse`]).
#[derive(Debug, Clone, PartialEq)]
pub struct NewSilence {
    pub matcher: SilenceMatcher,
    pub starts_at: Timestamp,
    pub ends_at: Timestamp,
    pub comment: Option<String>,
}

/// The body of `POST /api/v1/silences`, as sent: every field optional here so that
/// [`NewSilence::parse`] can say which one is wrong. Its OpenAPI schema is written
/// out below, saying what the parser requires.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SilenceRequest {
    #[serde(default)]
    pub device_ids: Option<Vec<String>>,
    #[serde(default)]
    pub pattern: Option<String>,
    #[serde(default)]
    pub labels: Option<Labels>,
    #[serde(default)]
    pub starts_at: Option<String>,
    #[serde(default)]
    pub ends_at: Option<String>,
    #[serde(default)]
    pub duration: Option<String>,
    #[serde(default)]
    pub comment: Option<String>,
}

impl NewSilence {
    /// Checks a request received at `now`. The error names the field at fault.
    ///
    /// Exactly one of `device_ids` (1 to [`MAX_DEVICE_IDS`] valid ids), `pattern`
    /// and `labels` (at least one); `starts_at` defaults to `now`; exactly one of
    /// `ends_at` and `duration` (counted from `starts_at`), ending after `starts_at`
    /// and after `now`; a comment of at most [`MAX_COMMENT`] characters.
    pub fn parse(request: SilenceRequest, now: Timestamp) -> Result<Self, String> {
        let SilenceRequest {
            device_ids,
            pattern,
            labels,
            starts_at,
            ends_at,
            duration,
            comment,
        } = request;
        let matcher = match (device_ids, pattern, labels) {
            (Some(ids), None, None) => devices(&ids)?,
            (None, Some(pattern), None) => SilenceMatcher::Pattern(
                IdPattern::parse(&pattern).map_err(|e| format!("pattern {pattern:?}: {e}"))?,
            ),
            (None, None, Some(labels)) => {
                if labels.is_empty() {
                    return Err("labels must name at least one label".into());
                }
                SilenceMatcher::Labels(labels)
            }
            (ids, pattern, labels) => {
                let named = usize::from(ids.is_some())
                    + usize::from(pattern.is_some())
                    + usize::from(labels.is_some());
                return Err(format!(
                    "give exactly one of device_ids, pattern or labels (this names {named})"
                ));
            }
        };
        let starts_at = starts_at
            .as_deref()
            .map(|text| time("starts_at", text))
            .transpose()?
            .unwrap_or(now);
        let ends_at = match (ends_at, duration) {
            (Some(text), None) => time("ends_at", &text)?,
            (None, Some(text)) => starts_at.saturating_add(
                crate::deadline::parse_text(&text).map_err(|e| format!("duration {e}"))?,
            ),
            (Some(_), Some(_)) => return Err("give ends_at or duration, not both".into()),
            (None, None) => return Err("ends_at (or duration) is required".into()),
        };
        if ends_at <= now {
            return Err(format!("ends_at ({ends_at}) is not in the future"));
        }
        if ends_at <= starts_at {
            return Err(format!(
                "ends_at ({ends_at}) must be after starts_at ({starts_at})"
            ));
        }
        if let Some(comment) = &comment
            && comment.chars().count() > MAX_COMMENT
        {
            return Err(format!(
                "comment is over the limit of {MAX_COMMENT} characters"
            ));
        }
        Ok(Self {
            matcher,
            starts_at,
            ends_at,
            comment,
        })
    }
}

/// `device_ids`, checked and sorted.
fn devices(ids: &[String]) -> Result<SilenceMatcher, String> {
    if ids.is_empty() {
        return Err("device_ids must name at least one device".into());
    }
    if ids.len() > MAX_DEVICE_IDS {
        return Err(format!(
            "device_ids names {} devices, over the limit of {MAX_DEVICE_IDS}",
            ids.len()
        ));
    }
    let ids = ids
        .iter()
        .enumerate()
        .map(|(i, text)| {
            DeviceId::parse(text).map_err(|e| format!("device_ids[{i}] {text:?}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(SilenceMatcher::devices(ids))
}

fn time(field: &str, text: &str) -> Result<Timestamp, String> {
    Timestamp::parse_rfc3339(text).map_err(|e| {
        format!("{field} {text:?} is not an RFC 3339 time such as 2026-12-24T18:00:00Z ({e})")
    })
}

/// What the OpenAPI document says of the request: every property with its bounds, no
/// others, exactly one matcher and exactly one of `ends_at` and `duration`. That the
/// end lies after the start and in the future is the one rule only the hub checks.
impl utoipa::PartialSchema for SilenceRequest {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{
            AdditionalProperties, AllOfBuilder, ArrayBuilder, KnownFormat, ObjectBuilder,
            OneOfBuilder, SchemaFormat, Type,
        };
        let time = || {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
        };
        let device_id = <DeviceId as utoipa::PartialSchema>::schema();
        let properties = ObjectBuilder::new()
            .schema_type(Type::Object)
            .property(
                "device_ids",
                ArrayBuilder::new()
                    .items(device_id)
                    .min_items(Some(1))
                    .max_items(Some(MAX_DEVICE_IDS)),
            )
            .property("pattern", <IdPattern as utoipa::PartialSchema>::schema())
            .property(
                "labels",
                AllOfBuilder::new()
                    .item(<Labels as utoipa::PartialSchema>::schema())
                    .item(ObjectBuilder::new().min_properties(Some(1))),
            )
            .property("starts_at", time().description(Some("Default: now")))
            .property(
                "ends_at",
                time().description(Some("After starts_at and in the future")),
            )
            .property(
                "duration",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(crate::deadline::DURATION_PATTERN))
                    .description(Some(
                        "Instead of ends_at: how long from starts_at (\"30m\", \"4h\")",
                    ))
                    .examples(["4h"]),
            )
            .property(
                "comment",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .max_length(Some(MAX_COMMENT)),
            )
            .additional_properties(Some(AdditionalProperties::FreeForm(false)));
        let one_of = |names: &[&str]| {
            let mut builder = OneOfBuilder::new();
            for name in names {
                builder = builder.item(ObjectBuilder::new().required(*name));
            }
            builder
        };
        AllOfBuilder::new()
            .item(properties)
            .item(one_of(&["device_ids", "pattern", "labels"]))
            .item(one_of(&["ends_at", "duration"]))
            .examples([serde_json::json!({
                "labels": {"site": "north"},
                "duration": "4h",
                "comment": "firmware roll-out"
            })])
            .into()
    }
}

impl utoipa::ToSchema for SilenceRequest {}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Timestamp = Timestamp::from_unix_millis(1_800_000_000_000);

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).expect("id")
    }

    fn labels(json: serde_json::Value) -> Labels {
        serde_json::from_value(json).expect("labels")
    }

    fn request(json: serde_json::Value) -> Result<NewSilence, String> {
        let request: SilenceRequest =
            serde_json::from_value(json).map_err(|e| format!("json: {e}"))?;
        NewSilence::parse(request, NOW)
    }

    fn silence(matcher: SilenceMatcher, from_ms: i64, until_ms: i64) -> Silence {
        Silence {
            id: 1,
            matcher,
            starts_at: Timestamp::from_unix_millis(from_ms),
            ends_at: Timestamp::from_unix_millis(until_ms),
            comment: None,
            created_at: Timestamp::from_unix_millis(0),
        }
    }

    #[test]
    fn each_matcher_names_its_devices() {
        let none = Labels::default();
        let north = labels(serde_json::json!({"site": "north", "kind": "pump"}));
        let listed = SilenceMatcher::devices(vec![id("b"), id("a"), id("b")]);
        assert_eq!(listed, SilenceMatcher::Devices(vec![id("a"), id("b")]));
        assert!(listed.matches(&id("a"), &none));
        assert!(!listed.matches(&id("c"), &none));
        let pattern = SilenceMatcher::Pattern(IdPattern::parse("pump-?*").expect("pattern"));
        assert!(pattern.matches(&id("pump-12"), &none));
        assert!(!pattern.matches(&id("pump-"), &none));
        let by_labels = SilenceMatcher::Labels(labels(serde_json::json!({"site": "north"})));
        assert!(
            by_labels.matches(&id("x"), &north),
            "other labels do not matter"
        );
        assert!(!by_labels.matches(&id("x"), &none));
        let both = SilenceMatcher::Labels(labels(
            serde_json::json!({"site": "north", "kind": "valve"}),
        ));
        assert!(!both.matches(&id("x"), &north), "every label must match");
    }

    #[test]
    fn a_silence_covers_from_its_start_up_to_not_including_its_end() {
        let s = silence(SilenceMatcher::devices(vec![id("a")]), 1_000, 2_000);
        let none = Labels::default();
        let at = Timestamp::from_unix_millis;
        assert!(!s.covers(&id("a"), &none, at(999)));
        assert!(s.covers(&id("a"), &none, at(1_000)));
        assert!(s.covers(&id("a"), &none, at(1_999)));
        assert!(!s.covers(&id("a"), &none, at(2_000)));
        assert!(!s.covers(&id("b"), &none, at(1_500)));
    }

    #[test]
    fn silenced_until_is_the_latest_end_among_the_covering_silences() {
        let all = SilenceMatcher::Pattern(IdPattern::parse("*").expect("pattern"));
        let silences = [
            silence(all.clone(), 0, 5_000),
            silence(all.clone(), 0, 9_000),
            silence(all, 6_000, 20_000),
            silence(SilenceMatcher::devices(vec![id("b")]), 0, 30_000),
        ];
        let none = Labels::default();
        let at = Timestamp::from_unix_millis;
        assert_eq!(
            silenced_until(&silences, &id("a"), &none, at(1_000)),
            Some(at(9_000))
        );
        assert_eq!(
            silenced_until(&silences, &id("a"), &none, at(7_000)),
            Some(at(20_000))
        );
        assert_eq!(silenced_until(&silences, &id("a"), &none, at(20_000)), None);
    }

    #[test]
    fn serialises_with_exactly_one_matcher_field() {
        let s = silence(
            SilenceMatcher::Pattern(IdPattern::parse("pump-*").expect("pattern")),
            0,
            1_000,
        );
        let json = serde_json::to_value(&s).expect("json");
        assert_eq!(json["pattern"], "pump-*");
        assert!(json.get("device_ids").is_none() && json.get("labels").is_none());
        let s = silence(SilenceMatcher::devices(vec![id("a")]), 0, 1_000);
        assert_eq!(
            serde_json::to_value(&s).expect("json")["device_ids"],
            serde_json::json!(["a"])
        );
    }

    #[test]
    fn a_request_defaults_its_start_to_now_and_takes_a_duration() {
        let new =
            request(serde_json::json!({"pattern": "pump-*", "duration": "2h"})).expect("valid");
        assert_eq!(new.starts_at, NOW);
        assert_eq!(
            new.ends_at,
            NOW.saturating_add(std::time::Duration::from_secs(7200))
        );
        let new = request(serde_json::json!({
            "labels": {"site": "north"},
            "starts_at": "2027-01-15T08:00:00Z",
            "ends_at": "2027-01-15T10:00:00+01:00",
            "comment": "swap",
        }))
        .expect("valid");
        assert_eq!(new.ends_at.millis_since(new.starts_at), 3_600_000);
        assert_eq!(new.comment.as_deref(), Some("swap"));
    }

    #[test]
    fn a_bad_request_is_refused_naming_the_field() {
        let long = "x".repeat(MAX_COMMENT + 1);
        let many: Vec<String> = (0..=MAX_DEVICE_IDS).map(|i| format!("d{i}")).collect();
        for (body, says) in [
            (serde_json::json!({"duration": "1h"}), "exactly one of"),
            (
                serde_json::json!({"pattern": "a*", "device_ids": ["a"], "duration": "1h"}),
                "exactly one of",
            ),
            (
                serde_json::json!({"device_ids": [], "duration": "1h"}),
                "device_ids",
            ),
            (
                serde_json::json!({"device_ids": many, "duration": "1h"}),
                "device_ids",
            ),
            (
                serde_json::json!({"device_ids": ["ok", "not ok"], "duration": "1h"}),
                "device_ids[1]",
            ),
            (
                serde_json::json!({"pattern": "a b", "duration": "1h"}),
                "pattern",
            ),
            (
                serde_json::json!({"pattern": "", "duration": "1h"}),
                "pattern",
            ),
            (
                serde_json::json!({"labels": {}, "duration": "1h"}),
                "labels",
            ),
            (serde_json::json!({"pattern": "*"}), "ends_at"),
            (
                serde_json::json!({"pattern": "*", "duration": "1h", "ends_at": "2030-01-01T00:00:00Z"}),
                "not both",
            ),
            (
                serde_json::json!({"pattern": "*", "duration": "1d"}),
                "duration",
            ),
            (
                serde_json::json!({"pattern": "*", "ends_at": "tomorrow"}),
                "ends_at",
            ),
            (
                serde_json::json!({"pattern": "*", "starts_at": "2030-01-02T00:00:00Z", "ends_at": "2030-01-01T00:00:00Z"}),
                "after starts_at",
            ),
            (
                serde_json::json!({"pattern": "*", "starts_at": "2020-01-01T00:00:00Z", "ends_at": "2020-01-02T00:00:00Z"}),
                "future",
            ),
            (
                serde_json::json!({"pattern": "*", "duration": "1h", "comment": long}),
                "comment",
            ),
            (
                serde_json::json!({"pattern": "*", "duration": "1h", "why": "x"}),
                "why",
            ),
        ] {
            let error = request(body.clone()).expect_err("refused");
            assert!(error.contains(says), "{body}: {error}");
        }
    }

    /// The pattern the OpenAPI document states takes exactly what is parsed.
    #[test]
    fn the_documented_pattern_matches_exactly_what_is_parsed() {
        let regex = regex::Regex::new(PATTERN_PATTERN).expect("pattern");
        let long = "a".repeat(MAX_PATTERN + 1);
        let longest = "*".repeat(MAX_PATTERN);
        for text in [
            "", "*", "pump-?", "a b", "a/b", "é", &long, &longest, "x:y.z_1",
        ] {
            assert_eq!(
                regex.is_match(text),
                IdPattern::parse(text).is_ok(),
                "{text:?}"
            );
        }
    }
}
