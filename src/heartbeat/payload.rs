//! The heartbeat payload of interface.md section 3: parsed, bounded and validated
//! before anything downstream sees it.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::RejectReason;
use crate::clock::Timestamp;
use crate::device::DeviceId;
use crate::update::{Heartbeat, OsInfo, Report};

/// Default cap on a heartbeat payload (`mqtt.max_payload`).
pub const DEFAULT_MAX_PAYLOAD: usize = 64 * 1024;

/// The deepest JSON nesting a heartbeat can need is two levels (`os_info`, `metrics`);
/// anything far deeper is not a heartbeat, even inside a field we would ignore.
pub const MAX_NESTING: usize = 8;
/// Longest accepted text field (`hostname`, `firmware_version`, `os_info` fields and
/// metric names), in characters (as JSON Schema's `maxLength` counts, so the OpenAPI
/// document can state it).
pub const MAX_TEXT: usize = 256;
/// Longest accepted `error` text, in characters.
pub const MAX_ERROR_TEXT: usize = 1024;
/// Most entries accepted in `metrics`. Without these caps one 64 KiB heartbeat could
/// take most of a megabyte once parsed, queued and batched.
pub const MAX_METRICS: usize = 64;

/// Why a payload is not a heartbeat.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("payload is {size} bytes, over the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("payload is not valid UTF-8")]
    InvalidUtf8,
    #[error("payload nests deeper than {MAX_NESTING} levels")]
    TooDeep,
    #[error("payload is not a JSON object")]
    NotAnObject,
    #[error("malformed JSON: {0}")]
    Malformed(serde_json::Error),
    #[error("invalid heartbeat field: {0}")]
    InvalidField(serde_json::Error),
    #[error("invalid heartbeat field: {0}")]
    OverLimit(String),
    #[error("invalid heartbeat field: parent {0:?} is the device itself")]
    OwnParent(DeviceId),
}

impl PayloadError {
    pub fn reason(&self) -> RejectReason {
        match self {
            PayloadError::TooLarge { .. } => RejectReason::TooLarge,
            PayloadError::InvalidUtf8 => RejectReason::InvalidUtf8,
            PayloadError::TooDeep => RejectReason::TooDeep,
            PayloadError::NotAnObject => RejectReason::NotAnObject,
            PayloadError::Malformed(_) => RejectReason::MalformedJson,
            PayloadError::InvalidField(_)
            | PayloadError::OverLimit(_)
            | PayloadError::OwnParent(_) => RejectReason::InvalidField,
        }
    }
}

/// Parses the heartbeat payload `device` sent, as [`parse`] does, and refuses one
/// that names `device` as its own `parent`: what the hub's receivers call.
pub fn parse_from(
    device: &DeviceId,
    payload: &[u8],
    limit: usize,
) -> Result<Heartbeat, PayloadError> {
    let heartbeat = parse(payload, limit)?;
    match &heartbeat.parent {
        Some(Some(parent)) if parent == device => Err(PayloadError::OwnParent(parent.clone())),
        _ => Ok(heartbeat),
    }
}

/// Parses a heartbeat payload. Zero bytes is a bare heartbeat; anything else must be a
/// JSON object of at most `limit` bytes whose known fields have the documented types.
pub fn parse(payload: &[u8], limit: usize) -> Result<Heartbeat, PayloadError> {
    if payload.len() > limit {
        return Err(PayloadError::TooLarge {
            size: payload.len(),
            limit,
        });
    }
    if payload.is_empty() {
        return Ok(Heartbeat {
            healthy: true,
            ..Heartbeat::default()
        });
    }
    let text = std::str::from_utf8(payload).map_err(|_| PayloadError::InvalidUtf8)?;
    if text.trim_start().as_bytes().first() != Some(&b'{') {
        // serde would happily read a struct from a JSON array; a heartbeat is an object.
        return Err(match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Err(e) => PayloadError::Malformed(e),
            Ok(_) => PayloadError::NotAnObject,
        });
    }
    if nesting_exceeds(payload, MAX_NESTING) {
        return Err(PayloadError::TooDeep);
    }
    let wire: Wire = serde_json::from_str(text).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => PayloadError::InvalidField(e),
        _ => PayloadError::Malformed(e),
    })?;
    // On what arrived: an over-long `error` is refused even when `status` is ok and
    // the text would be dropped.
    check_limits(&wire)?;
    Ok(Heartbeat::from(wire))
}

fn check_limits(wire: &Wire) -> Result<(), PayloadError> {
    let too_long = |name: &str, text: &Option<String>, limit: usize| match text {
        Some(text) if text.chars().count() > limit => Err(PayloadError::OverLimit(format!(
            "{name} is {} characters, over the {limit}-character limit",
            text.chars().count()
        ))),
        _ => Ok(()),
    };
    too_long("error", &wire.error, MAX_ERROR_TEXT)?;
    too_long("hostname", &wire.hostname, MAX_TEXT)?;
    too_long("firmware_version", &wire.firmware_version, MAX_TEXT)?;
    if let Some(os) = &wire.os_info {
        too_long("os_info.distribution", &os.distribution, MAX_TEXT)?;
        too_long("os_info.version", &os.version, MAX_TEXT)?;
        too_long("os_info.kernel", &os.kernel, MAX_TEXT)?;
        too_long("os_info.architecture", &os.architecture, MAX_TEXT)?;
    }
    if let Some(metrics) = &wire.metrics {
        if metrics.len() > MAX_METRICS {
            return Err(PayloadError::OverLimit(format!(
                "metrics has {} entries, over the limit of {MAX_METRICS}",
                metrics.len()
            )));
        }
        if let Some(name) = metrics.keys().find(|name| name.chars().count() > MAX_TEXT) {
            return Err(PayloadError::OverLimit(format!(
                "metric name of {} characters is over the {MAX_TEXT}-character limit",
                name.chars().count()
            )));
        }
    }
    Ok(())
}

/// True when brackets outside strings nest deeper than `limit`. serde_json ignores
/// unknown fields without a depth limit, so the bound is enforced here.
fn nesting_exceeds(json: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in json {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// The payload as it arrives; unknown fields are ignored. Its schema is the
/// documented heartbeat body (`HeartbeatPayload` in the OpenAPI document), limits
/// included.
#[derive(Deserialize, utoipa::ToSchema)]
#[schema(as = HeartbeatPayload)]
pub(crate) struct Wire {
    /// The device's clock, RFC 3339.
    #[serde(default, deserialize_with = "device_time")]
    #[schema(value_type = Option<String>, format = DateTime, pattern = r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])[Tt]([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,9})?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$")]
    timestamp: Option<Timestamp>,
    /// `error` puts the device in status error; the default is ok.
    #[serde(default)]
    status: Option<Health>,
    /// What is wrong; kept only with `"status":"error"`.
    #[serde(default)]
    #[schema(max_length = 1024)]
    error: Option<String>,
    #[serde(default, deserialize_with = "whole_number")]
    #[schema(maximum = 9_223_372_036_854_775_807_u64)]
    uptime_seconds: Option<u64>,
    /// Bytes.
    #[serde(default, deserialize_with = "whole_number")]
    #[schema(maximum = 9_223_372_036_854_775_807_u64)]
    free_memory: Option<u64>,
    #[serde(default)]
    #[schema(max_length = 256)]
    firmware_version: Option<String>,
    #[serde(default)]
    #[schema(max_length = 256)]
    hostname: Option<String>,
    #[serde(default, deserialize_with = "object_or_null")]
    os_info: Option<OsInfo>,
    /// Latest values by name (names up to 256 characters), replaced as a whole.
    #[serde(default)]
    #[schema(schema_with = metrics_schema)]
    metrics: Option<BTreeMap<String, f64>>,
    /// How often the device sends heartbeats: seconds (`30`, `2.5`) or whole seconds,
    /// minutes or hours (`"30s"`, `"10m"`, `"2h"`), from 1 s to 30 days. The device goes offline after
    /// `heartbeat.missed_beats` of them are missing, unless it has an `offline_after`
    /// of its own.
    #[serde(default, deserialize_with = "interval")]
    #[schema(schema_with = interval_schema)]
    interval: Option<std::time::Duration>,
    /// Labels the device declares, `{"site": "north"}`: set key by key, others kept
    /// (interface.md "Labels").
    #[serde(default)]
    labels: Option<crate::labels::Labels>,
    /// The device this one is reached through (a gateway's id): kept until a heartbeat
    /// names another; `null` clears it (interface.md "Dependencies"). A device cannot
    /// be its own parent.
    #[serde(default, deserialize_with = "parent")]
    #[schema(value_type = Option<String>, pattern = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$", max_length = 128, example = "gw-1")]
    parent: Option<Option<DeviceId>>,
}

/// `parent`: present (`Some`) even when `null`, which clears the stored parent, where
/// every other field's `null` counts as absent; a string must be a device id.
fn parent<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<DeviceId>>, D::Error> {
    let text: Option<std::borrow::Cow<'de, str>> = Option::deserialize(d)?;
    text.map(|t| {
        DeviceId::parse(&t).map_err(|e| serde::de::Error::custom(format!("parent {t:?}: {e}")))
    })
    .transpose()
    .map(Some)
}

/// `interval` as documented: a number of seconds, a duration string, or null.
fn interval_schema() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
    OneOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Number)
                .minimum(Some(1.0))
                .maximum(Some(crate::deadline::MAX.as_secs_f64())),
        )
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(crate::deadline::DURATION_PATTERN))
                .examples([serde_json::json!("30s")]),
        )
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .build()
        .into()
}

/// `metrics` as documented: numbers by name, at most [`MAX_METRICS`] of them, names
/// up to [`MAX_TEXT`] characters; or null.
fn metrics_schema() -> utoipa::openapi::Object {
    use utoipa::openapi::schema::{ObjectBuilder, SchemaType, Type};
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Object, Type::Null]))
        .additional_properties(Some(ObjectBuilder::new().schema_type(Type::Number)))
        .property_names(Some(ObjectBuilder::new().max_length(Some(MAX_TEXT))))
        .max_properties(Some(MAX_METRICS))
        .build()
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
enum Health {
    Ok,
    Error,
}

/// A struct from a JSON object only: serde's derived code would also read one from an
/// array (`[null, null]`), which the documented schema does not allow.
fn object_or_null<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    use serde::de::{MapAccess, Visitor, value::MapAccessDeserializer};

    struct ObjectOrNull<T>(std::marker::PhantomData<T>);

    impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectOrNull<T> {
        type Value = Option<T>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object or null")
        }

        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D2: serde::Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            d.deserialize_map(self)
        }

        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            T::deserialize(MapAccessDeserializer::new(map)).map(Some)
        }
    }

    d.deserialize_option(ObjectOrNull(std::marker::PhantomData))
}

/// A count: a JSON integer from 0 to `i64::MAX` (what the database holds), written
/// either way JSON allows (`86400` or `86400.0`, as some firmware's JSON libraries
/// print whole numbers).
fn whole_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let Some(number) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    let value = match (number.as_u64(), number.as_f64()) {
        (Some(n), _) => Some(n),
        (None, Some(f)) if f >= 0.0 && f.fract() == 0.0 && f < 9.223_372_036_854_776e18 => {
            Some(f as u64)
        }
        _ => None,
    };
    match value {
        Some(n) if i64::try_from(n).is_ok() => Ok(Some(n)),
        _ => Err(serde::de::Error::custom(format!(
            "{number} is not a whole number from 0 to {}",
            i64::MAX
        ))),
    }
}

/// Seconds as a JSON number within [`crate::deadline::MIN`]..=[`crate::deadline::MAX`],
/// or whole seconds, minutes or hours as a string ([`crate::deadline::parse_text`]);
/// or null.
fn interval<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<std::time::Duration>, D::Error> {
    use serde::de::{Error, Visitor};
    use std::time::Duration;

    struct Interval;

    impl<'de> Visitor<'de> for Interval {
        type Value = Option<Duration>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("seconds or a duration such as \"30s\"")
        }

        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D2: serde::Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            d.deserialize_any(self)
        }

        fn visit_u64<E: Error>(self, s: u64) -> Result<Self::Value, E> {
            bounded(Duration::from_secs(s))
        }

        fn visit_i64<E: Error>(self, s: i64) -> Result<Self::Value, E> {
            Err(E::custom(format!(
                "interval {s} is not a number of seconds above zero"
            )))
        }

        fn visit_f64<E: Error>(self, s: f64) -> Result<Self::Value, E> {
            let d = Duration::try_from_secs_f64(s)
                .map_err(|_| E::custom(format!("interval {s} is not a number of seconds")))?;
            bounded(d)
        }

        fn visit_str<E: Error>(self, t: &str) -> Result<Self::Value, E> {
            crate::deadline::parse_text(t)
                .map(Some)
                .map_err(|e| E::custom(format!("interval {e}")))
        }
    }

    fn bounded<E: Error>(d: Duration) -> Result<Option<Duration>, E> {
        crate::deadline::bounded(d)
            .map(Some)
            .map_err(|e| E::custom(format!("interval {e}")))
    }

    d.deserialize_option(Interval)
}

fn device_time<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Timestamp>, D::Error> {
    let text: Option<std::borrow::Cow<'de, str>> = Option::deserialize(d)?;
    text.map(|t| {
        Timestamp::parse_rfc3339(&t)
            .map_err(|e| serde::de::Error::custom(format!("timestamp {t:?} is not RFC 3339: {e}")))
    })
    .transpose()
}

impl From<Wire> for Heartbeat {
    fn from(wire: Wire) -> Self {
        let healthy = wire.status != Some(Health::Error);
        Heartbeat {
            healthy,
            error: if healthy { None } else { wire.error },
            device_time: wire.timestamp,
            interval: wire.interval,
            labels: wire.labels,
            parent: wire.parent,
            report: Report {
                uptime_seconds: wire.uptime_seconds,
                free_memory: wire.free_memory,
                firmware_version: wire.firmware_version,
                hostname: wire.hostname,
                os_info: wire.os_info,
                metrics: wire.metrics,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(json: &str) -> Heartbeat {
        match parse(json.as_bytes(), DEFAULT_MAX_PAYLOAD) {
            Ok(hb) => hb,
            Err(e) => panic!("{json}: {e}"),
        }
    }

    fn reason(payload: &[u8]) -> RejectReason {
        match parse(payload, DEFAULT_MAX_PAYLOAD) {
            Ok(hb) => panic!("accepted {:?} as {hb:?}", String::from_utf8_lossy(payload)),
            Err(e) => e.reason(),
        }
    }

    #[test]
    fn empty_payload_is_a_bare_healthy_heartbeat() {
        let hb = parse(b"", DEFAULT_MAX_PAYLOAD).expect("bare heartbeat");
        assert!(hb.healthy);
        assert_eq!(hb.report, Report::default());
    }

    #[test]
    fn full_payload_keeps_every_field_and_ignores_unknown_ones() {
        let hb = parse_ok(
            r#"{"timestamp":"2026-11-22T10:00:00Z","status":"ok","uptime_seconds":42,
                "free_memory":1024,"firmware_version":"1.2.3","hostname":"pump-7",
                "os_info":{"distribution":"debian","version":"12","kernel":"6.1","architecture":"arm64"},
                "metrics":{"temp_c":21.5,"rssi":-70},"future_field":{"a":[1,2,3]}}"#,
        );
        assert!(hb.healthy);
        assert_eq!(
            hb.device_time.map(Timestamp::to_rfc3339).as_deref(),
            Some("2026-11-22T10:00:00.000Z")
        );
        assert_eq!(hb.report.uptime_seconds, Some(42));
        assert_eq!(hb.report.free_memory, Some(1024));
        assert_eq!(hb.report.firmware_version.as_deref(), Some("1.2.3"));
        assert_eq!(hb.report.hostname.as_deref(), Some("pump-7"));
        assert_eq!(
            hb.report.os_info.as_ref().and_then(|o| o.kernel.as_deref()),
            Some("6.1")
        );
        assert_eq!(
            hb.report.metrics.as_ref().and_then(|m| m.get("rssi")),
            Some(&-70.0)
        );
    }

    #[test]
    fn error_status_keeps_the_error_text_and_ok_drops_it() {
        let hb = parse_ok(r#"{"status":"error","error":"disk full"}"#);
        assert!(!hb.healthy);
        assert_eq!(hb.error.as_deref(), Some("disk full"));
        let hb = parse_ok(r#"{"status":"ok","error":"stale"}"#);
        assert!(hb.healthy);
        assert_eq!(hb.error, None);
    }

    #[test]
    fn null_fields_count_as_absent() {
        let hb = parse_ok(r#"{"status":null,"hostname":null,"timestamp":null}"#);
        assert!(hb.healthy);
        assert_eq!(hb.report.hostname, None);
    }

    #[test]
    fn bad_payloads_are_rejected_with_their_reason() {
        assert_eq!(reason(b"{not json"), RejectReason::MalformedJson);
        assert_eq!(reason(b"[1,2,3]"), RejectReason::NotAnObject);
        assert_eq!(reason(b"\"ok\""), RejectReason::NotAnObject);
        assert_eq!(reason(b"   "), RejectReason::MalformedJson);
        assert_eq!(
            reason(br#"{"uptime_seconds":"long"}"#),
            RejectReason::InvalidField
        );
        assert_eq!(reason(br#"{"free_memory":-1}"#), RejectReason::InvalidField);
        assert_eq!(
            reason(br#"{"metrics":{"t":"hot"}}"#),
            RejectReason::InvalidField
        );
        assert_eq!(
            reason(br#"{"os_info":"linux"}"#),
            RejectReason::InvalidField
        );
        assert_eq!(
            reason(br#"{"status":"sleeping"}"#),
            RejectReason::InvalidField
        );
        assert_eq!(
            reason(br#"{"timestamp":"yesterday"}"#),
            RejectReason::InvalidField
        );
        assert_eq!(
            reason(b"{\"hostname\":\"\xff\xfe\"}"),
            RejectReason::InvalidUtf8
        );
    }

    #[test]
    fn interval_is_seconds_or_a_duration_within_a_second_and_thirty_days() {
        use std::time::Duration;
        let interval = |json: &str| parse_ok(json).interval;
        assert_eq!(
            interval(r#"{"interval":30}"#),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            interval(r#"{"interval":2.5}"#),
            Some(Duration::from_millis(2_500))
        );
        assert_eq!(
            interval(r#"{"interval":"90m"}"#),
            Some(Duration::from_secs(5_400))
        );
        assert_eq!(interval(r#"{"interval":null}"#), None);
        assert_eq!(interval("{}"), None);
        for bad in [
            r#"{"interval":0}"#,
            r#"{"interval":-5}"#,
            r#"{"interval":0.5}"#,
            r#"{"interval":"soon"}"#,
            r#"{"interval":"31days"}"#,
            r#"{"interval":"721h"}"#,
            r#"{"interval":"1h 30m"}"#,
            r#"{"interval":1e300}"#,
            r#"{"interval":[30]}"#,
        ] {
            assert_eq!(reason(bad.as_bytes()), RejectReason::InvalidField, "{bad}");
        }
        let Err(e) = parse(br#"{"interval":0}"#, DEFAULT_MAX_PAYLOAD) else {
            panic!("accepted");
        };
        assert!(
            e.to_string()
                .contains("interval must be between 1s and 30days"),
            "{e}"
        );
    }

    #[test]
    fn labels_are_a_bounded_object_of_strings() {
        let hb = parse_ok(r#"{"labels":{"site":"north","kind":"pump"}}"#);
        assert_eq!(
            hb.labels.as_ref().and_then(|l| l.get("site")),
            Some("north")
        );
        assert_eq!(parse_ok(r#"{"labels":null}"#).labels, None);
        for bad in [
            r#"{"labels":{"site":1}}"#,
            r#"{"labels":{"si:te":"x"}}"#,
            r#"{"labels":["site"]}"#,
            r#"{"labels":{"site":"a,b"}}"#,
        ] {
            assert_eq!(reason(bad.as_bytes()), RejectReason::InvalidField, "{bad}");
        }
    }

    #[test]
    fn parent_is_a_device_id_null_clears_it_and_a_device_cannot_name_itself() {
        let gw = DeviceId::parse("gw-1").expect("id");
        assert_eq!(
            parse_ok(r#"{"parent":"gw-1"}"#).parent,
            Some(Some(gw.clone()))
        );
        assert_eq!(parse_ok(r#"{"parent":null}"#).parent, Some(None));
        assert_eq!(parse_ok("{}").parent, None);
        for bad in [
            r#"{"parent":""}"#,
            r#"{"parent":"gw/1"}"#,
            r#"{"parent":"-gw"}"#,
            r#"{"parent":7}"#,
            r#"{"parent":{"id":"gw-1"}}"#,
        ] {
            assert_eq!(reason(bad.as_bytes()), RejectReason::InvalidField, "{bad}");
        }
        let Err(e) = parse(br#"{"parent":"gw/1"}"#, DEFAULT_MAX_PAYLOAD) else {
            panic!("accepted");
        };
        assert!(e.to_string().contains(r#"parent "gw/1""#), "{e}");

        let child = DeviceId::parse("pump-7").expect("id");
        let hb = parse_from(&child, br#"{"parent":"gw-1"}"#, DEFAULT_MAX_PAYLOAD);
        assert_eq!(hb.map(|hb| hb.parent).ok(), Some(Some(Some(gw.clone()))));
        match parse_from(&gw, br#"{"parent":"gw-1"}"#, DEFAULT_MAX_PAYLOAD) {
            Err(e) => {
                assert_eq!(e.reason(), RejectReason::InvalidField);
                assert!(e.to_string().contains("is the device itself"), "{e}");
            }
            Ok(hb) => panic!("accepted {hb:?}"),
        }
        // Clearing is no self-reference.
        assert!(parse_from(&gw, br#"{"parent":null}"#, DEFAULT_MAX_PAYLOAD).is_ok());
    }

    #[test]
    fn deep_nesting_is_rejected_even_in_ignored_fields() {
        let deep = format!("{{\"x\":{}{}}}", "[".repeat(5000), "]".repeat(5000));
        assert_eq!(reason(deep.as_bytes()), RejectReason::TooDeep);
        // Brackets inside strings do not count.
        let hb = parse_ok(&format!("{{\"hostname\":\"{}\"}}", "[".repeat(100)));
        assert_eq!(hb.report.hostname.map(|h| h.len()), Some(100));
    }

    #[test]
    fn oversized_fields_are_rejected() {
        let long = "x".repeat(MAX_TEXT + 1);
        assert_eq!(
            reason(format!("{{\"hostname\":\"{long}\"}}").as_bytes()),
            RejectReason::InvalidField
        );
        assert_eq!(
            reason(format!("{{\"os_info\":{{\"kernel\":\"{long}\"}}}}").as_bytes()),
            RejectReason::InvalidField
        );
        let many: Vec<String> = (0..=MAX_METRICS).map(|i| format!("\"m{i}\":1")).collect();
        assert_eq!(
            reason(format!("{{\"metrics\":{{{}}}}}", many.join(",")).as_bytes()),
            RejectReason::InvalidField
        );
        let within: Vec<String> = (0..MAX_METRICS).map(|i| format!("\"m{i}\":1")).collect();
        let hb = parse_ok(&format!("{{\"metrics\":{{{}}}}}", within.join(",")));
        assert_eq!(hb.report.metrics.map(|m| m.len()), Some(MAX_METRICS));
    }

    #[test]
    fn counts_are_whole_numbers_within_what_the_database_holds() {
        let hb = parse_ok(r#"{"uptime_seconds":86400.0,"free_memory":5}"#);
        assert_eq!(
            (hb.report.uptime_seconds, hb.report.free_memory),
            (Some(86400), Some(5))
        );
        for bad in [
            r#"{"os_info":[null,null]}"#,
            r#"{"os_info":"debian"}"#,
            r#"{"uptime_seconds":1.5}"#,
            r#"{"uptime_seconds":-1}"#,
            r#"{"free_memory":9223372036854775808}"#,
            r#"{"free_memory":"5"}"#,
        ] {
            assert_eq!(reason(bad.as_bytes()), RejectReason::InvalidField, "{bad}");
        }
    }

    #[test]
    fn an_over_long_error_text_is_refused_even_when_it_would_be_dropped() {
        let long = "e".repeat(MAX_ERROR_TEXT + 1);
        assert_eq!(
            reason(format!("{{\"status\":\"ok\",\"error\":\"{long}\"}}").as_bytes()),
            RejectReason::InvalidField
        );
        // Characters, not bytes: 256 two-byte characters are within the limit.
        let accented = "é".repeat(MAX_TEXT);
        let hb = parse_ok(&format!("{{\"hostname\":\"{accented}\"}}"));
        assert_eq!(
            hb.report.hostname.map(|h| h.chars().count()),
            Some(MAX_TEXT)
        );
    }

    #[test]
    fn payload_over_the_limit_is_rejected_before_parsing() {
        let big = vec![b' '; 65];
        match parse(&big, 64) {
            Err(PayloadError::TooLarge {
                size: 65,
                limit: 64,
            }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn merge_keeps_fields_the_newer_report_leaves_out() {
        let mut stored = parse_ok(r#"{"hostname":"a","uptime_seconds":1}"#).report;
        stored.merge(parse_ok(r#"{"uptime_seconds":2}"#).report);
        assert_eq!(stored.hostname.as_deref(), Some("a"));
        assert_eq!(stored.uptime_seconds, Some(2));
    }
}
