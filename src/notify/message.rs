//! What a sink is told of a transition, in the forms the sinks speak: Standard
//! Webhooks JSON for a machine, a few lines of text for a person.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::filter::is_recovery;
use crate::clock::Timestamp;
use crate::event::StatusEvent;
use crate::status::{Reason, Status};

/// A transition and what a person needs besides it. Stored as JSON with each pending
/// notification, so a delivery after a restart says exactly what the first would have.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notice {
    #[serde(flatten)]
    pub event: StatusEvent,
    /// For a recovery: when the device went offline or into error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down_since: Option<Timestamp>,
}

/// The webhook body: Standard Webhooks' `{"type", "timestamp", "data"}`.
#[derive(Serialize)]
struct Envelope<'a> {
    r#type: &'static str,
    timestamp: Timestamp,
    data: Data<'a>,
}

#[derive(Serialize)]
struct Data<'a> {
    #[serde(flatten)]
    notice: &'a Notice,
    /// How long the device was down, in seconds, for a recovery.
    #[serde(skip_serializing_if = "Option::is_none")]
    down_for_s: Option<f64>,
}

impl Notice {
    /// `device.offline`, `device.error`, `device.recovered`, `device.online` or
    /// `device.provisioning`.
    pub fn kind(&self) -> &'static str {
        match self.event.status {
            Status::Offline => "device.offline",
            Status::Error => "device.error",
            Status::Online if is_recovery(&self.event) => "device.recovered",
            Status::Online => "device.online",
            Status::Provisioning => "device.provisioning",
        }
    }

    pub fn down_for(&self) -> Option<Duration> {
        let since = self.down_since?;
        let millis = self.event.changed_at.millis_since(since);
        u64::try_from(millis).ok().map(Duration::from_millis)
    }

    /// The JSON a webhook receives.
    pub fn webhook_body(&self) -> String {
        let envelope = Envelope {
            r#type: self.kind(),
            timestamp: self.event.changed_at,
            data: Data {
                notice: self,
                down_for_s: self.down_for().map(|d| d.as_secs_f64()),
            },
        };
        // Plain fields serialise without fail.
        serde_json::to_string(&envelope).unwrap_or_default()
    }

    /// A few lines for a person (Telegram, Slack).
    pub fn text(&self) -> String {
        let id = &self.event.device_id;
        let at = |t: Timestamp| t.to_datetime().format("%Y-%m-%d %H:%M:%S UTC").to_string();
        let last_seen = match self.event.last_seen_at {
            Some(seen) => {
                let before = self.event.changed_at.millis_since(seen).max(0) as u64;
                format!(
                    "Last seen: {} ({} before the alert)",
                    at(seen),
                    human(Duration::from_millis(before))
                )
            }
            None => "Never heard from".to_string(),
        };
        match self.kind() {
            "device.offline" => {
                let cause = match self.event.reason {
                    Reason::ConnectionLost => "its connection dropped (MQTT Last Will)",
                    _ => "no heartbeat within its deadline",
                };
                format!("🔴 {id} is offline\n{last_seen}\nCause: {cause}")
            }
            "device.error" => {
                let what = self.event.error.as_deref().unwrap_or("(no error text)");
                format!(
                    "🟠 {id} reports an error: {what}\nSince: {}",
                    at(self.event.changed_at)
                )
            }
            "device.recovered" => match (self.down_for(), self.down_since) {
                (Some(down), Some(since)) => format!(
                    "🟢 {id} is back online\nDown for: {} (since {})",
                    human(down),
                    at(since)
                ),
                _ => format!("🟢 {id} is back online"),
            },
            "device.online" => format!("🟢 {id} is online (first heartbeat)"),
            _ => format!("⚪ {id} is registered, waiting for its first heartbeat"),
        }
    }
}

/// What a sink sends: a notice, or a test message an operator asked for.
#[derive(Debug, Clone, Copy)]
pub enum Message<'a> {
    Notice(&'a Notice),
    Test { sink: &'a str, at: Timestamp },
}

impl Message<'_> {
    pub fn webhook_body(&self) -> String {
        match self {
            Message::Notice(notice) => notice.webhook_body(),
            Message::Test { sink, at } => serde_json::to_string(&serde_json::json!({
                "type": "fleetwatch.test",
                "timestamp": at,
                "data": { "sink": sink, "message": self.text() },
            }))
            .unwrap_or_default(),
        }
    }

    pub fn text(&self) -> String {
        match self {
            Message::Notice(notice) => notice.text(),
            Message::Test { sink, .. } => {
                format!("✅ fleetwatch test message for sink {sink}: notifications reach you here")
            }
        }
    }
}

/// `2m15s`, `1h3m`, `45s`, `3d4h`: the two largest units.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DeviceId;
    use crate::status::Transition;

    fn at(text: &str) -> Timestamp {
        Timestamp::parse_rfc3339(text).expect("time")
    }

    fn notice(from: Status, to: Status, reason: Reason) -> Notice {
        let mut event = StatusEvent::new(
            DeviceId::parse("pump-7").expect("id"),
            Transition {
                from: Some(from),
                to,
                reason,
            },
            Some(at("2026-11-22T10:00:00Z")),
            at("2026-11-22T10:02:15Z"),
        );
        event.event_id = uuid::Uuid::nil();
        Notice {
            event,
            down_since: None,
        }
    }

    #[test]
    fn texts_say_what_happened_and_when() {
        let offline = notice(Status::Online, Status::Offline, Reason::HeartbeatTimeout);
        assert_eq!(
            offline.text(),
            "🔴 pump-7 is offline\nLast seen: 2026-11-22 10:00:00 UTC (2m15s before the alert)\n\
             Cause: no heartbeat within its deadline"
        );
        let mut back = notice(Status::Offline, Status::Online, Reason::Heartbeat);
        back.down_since = Some(at("2026-11-22T09:00:00Z"));
        assert_eq!(
            back.text(),
            "🟢 pump-7 is back online\nDown for: 1h2m (since 2026-11-22 09:00:00 UTC)"
        );
        let mut error = notice(Status::Online, Status::Error, Reason::DeviceError);
        error.event.error = Some("disk full".into());
        assert!(
            error
                .text()
                .starts_with("🟠 pump-7 reports an error: disk full")
        );
    }

    #[test]
    fn the_webhook_body_is_a_standard_webhooks_envelope() {
        let mut back = notice(Status::Offline, Status::Online, Reason::Heartbeat);
        back.down_since = Some(at("2026-11-22T10:00:15Z"));
        let body: serde_json::Value = serde_json::from_str(&back.webhook_body()).expect("json");
        assert_eq!(
            body,
            serde_json::json!({
                "type": "device.recovered",
                "timestamp": "2026-11-22T10:02:15.000Z",
                "data": {
                    "event_id": "00000000-0000-0000-0000-000000000000",
                    "device_id": "pump-7",
                    "status": "online",
                    "previous_status": "offline",
                    "reason": "heartbeat",
                    "last_seen_at": "2026-11-22T10:00:00.000Z",
                    "changed_at": "2026-11-22T10:02:15.000Z",
                    "down_since": "2026-11-22T10:00:15.000Z",
                    "down_for_s": 120.0
                }
            })
        );
        let stored: Notice =
            serde_json::from_slice(&serde_json::to_vec(&back).expect("json")).expect("reads back");
        assert_eq!(stored, back);

        let mut error = notice(Status::Online, Status::Error, Reason::DeviceError);
        error.event.error = Some("disk full".into());
        let body: serde_json::Value = serde_json::from_str(&error.webhook_body()).expect("json");
        assert_eq!(body["type"], "device.error");
        assert_eq!(body["data"]["error"], "disk full");
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human(Duration::from_secs(45)), "45s");
        assert_eq!(human(Duration::from_secs(135)), "2m15s");
        assert_eq!(human(Duration::from_secs(3780)), "1h3m");
        assert_eq!(human(Duration::from_secs(3 * 86_400 + 4 * 3600)), "3d4h");
    }
}
