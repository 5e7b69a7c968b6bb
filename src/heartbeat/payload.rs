//! The heartbeat payload of interface.md section 3: parsed, bounded and validated
//! before anything downstream sees it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::RejectReason;
use crate::clock::Timestamp;

/// Default cap on a heartbeat payload (`mqtt.max_payload`).
pub const DEFAULT_MAX_PAYLOAD: usize = 64 * 1024;

/// The deepest JSON nesting a heartbeat can need is two levels (`os_info`, `metrics`);
/// anything far deeper is not a heartbeat, even inside a field we would ignore.
pub const MAX_NESTING: usize = 8;
/// Longest accepted text field (`hostname`, `firmware_version`, `os_info` fields and
/// metric names), in bytes.
pub const MAX_TEXT: usize = 256;
/// Longest accepted `error` text, in bytes.
pub const MAX_ERROR_TEXT: usize = 1024;
/// Most entries accepted in `metrics`. Without these caps one 64 KiB heartbeat could
/// take most of a megabyte once parsed, queued and batched.
pub const MAX_METRICS: usize = 64;

/// A valid heartbeat. The receipt time is not here: it is the hub's, added by whoever
/// received the message.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Heartbeat {
    /// False when the device said `"status":"error"`.
    pub healthy: bool,
    /// The device's error text; only kept with `"status":"error"`.
    pub error: Option<String>,
    /// The device's own clock (`timestamp`), kept so skew can be shown.
    pub device_time: Option<Timestamp>,
    pub report: Report,
}

/// What a device reports about itself. Fields it leaves out keep their stored value.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Report {
    pub uptime_seconds: Option<u64>,
    pub free_memory: Option<u64>,
    pub firmware_version: Option<String>,
    pub hostname: Option<String>,
    pub os_info: Option<OsInfo>,
    pub metrics: Option<BTreeMap<String, f64>>,
}

impl Report {
    /// Overlays the fields `newer` carries onto `self`.
    pub fn merge(&mut self, newer: Report) {
        let Report {
            uptime_seconds,
            free_memory,
            firmware_version,
            hostname,
            os_info,
            metrics,
        } = newer;
        overlay(&mut self.uptime_seconds, uptime_seconds);
        overlay(&mut self.free_memory, free_memory);
        overlay(&mut self.firmware_version, firmware_version);
        overlay(&mut self.hostname, hostname);
        overlay(&mut self.os_info, os_info);
        overlay(&mut self.metrics, metrics);
    }
}

fn overlay<T>(slot: &mut Option<T>, newer: Option<T>) {
    if newer.is_some() {
        *slot = newer;
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OsInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distribution: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
}

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
}

impl PayloadError {
    pub fn reason(&self) -> RejectReason {
        match self {
            PayloadError::TooLarge { .. } => RejectReason::TooLarge,
            PayloadError::InvalidUtf8 => RejectReason::InvalidUtf8,
            PayloadError::TooDeep => RejectReason::TooDeep,
            PayloadError::NotAnObject => RejectReason::NotAnObject,
            PayloadError::Malformed(_) => RejectReason::MalformedJson,
            PayloadError::InvalidField(_) | PayloadError::OverLimit(_) => {
                RejectReason::InvalidField
            }
        }
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
    let heartbeat = Heartbeat::from(wire);
    check_limits(&heartbeat)?;
    Ok(heartbeat)
}

fn check_limits(heartbeat: &Heartbeat) -> Result<(), PayloadError> {
    let too_long = |name: &str, text: &Option<String>, limit: usize| match text {
        Some(text) if text.len() > limit => Err(PayloadError::OverLimit(format!(
            "{name} is {} bytes, over the {limit}-byte limit",
            text.len()
        ))),
        _ => Ok(()),
    };
    let report = &heartbeat.report;
    too_long("error", &heartbeat.error, MAX_ERROR_TEXT)?;
    too_long("hostname", &report.hostname, MAX_TEXT)?;
    too_long("firmware_version", &report.firmware_version, MAX_TEXT)?;
    if let Some(os) = &report.os_info {
        too_long("os_info.distribution", &os.distribution, MAX_TEXT)?;
        too_long("os_info.version", &os.version, MAX_TEXT)?;
        too_long("os_info.kernel", &os.kernel, MAX_TEXT)?;
        too_long("os_info.architecture", &os.architecture, MAX_TEXT)?;
    }
    if let Some(metrics) = &report.metrics {
        if metrics.len() > MAX_METRICS {
            return Err(PayloadError::OverLimit(format!(
                "metrics has {} entries, over the limit of {MAX_METRICS}",
                metrics.len()
            )));
        }
        if let Some(name) = metrics.keys().find(|name| name.len() > MAX_TEXT) {
            return Err(PayloadError::OverLimit(format!(
                "metric name of {} bytes is over the {MAX_TEXT}-byte limit",
                name.len()
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

/// The payload as it arrives; unknown fields are ignored.
#[derive(Deserialize)]
struct Wire {
    #[serde(default, deserialize_with = "device_time")]
    timestamp: Option<Timestamp>,
    #[serde(default)]
    status: Option<Health>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    uptime_seconds: Option<u64>,
    #[serde(default)]
    free_memory: Option<u64>,
    #[serde(default)]
    firmware_version: Option<String>,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    os_info: Option<OsInfo>,
    #[serde(default)]
    metrics: Option<BTreeMap<String, f64>>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Health {
    Ok,
    Error,
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
