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
    /// For a parent gone offline: the devices that name it (unreachable behind it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub behind: Option<Behind>,
    /// For a reminder (`notify.repeat_after`): which one, from 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reminder: Option<u32>,
}

/// The devices behind a parent: how many, and the first few ids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Behind {
    pub count: u64,
    pub first: Vec<crate::device::DeviceId>,
}

/// Transitions of one kind, grouped (`notify.group_threshold` or more within
/// `notify.group_wait`): one message for all of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupNotice {
    /// The members' kind (`device.offline`, ...).
    pub member_kind: String,
    pub count: usize,
    /// The labels of `notify.group_by` the members share (empty: the whole fleet).
    pub group: std::collections::BTreeMap<String, String>,
    /// The dashboard, filtered to the group, when `notify.dashboard_url` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dashboard_url: Option<String>,
    pub events: Vec<Notice>,
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
    /// `device.offline`, `device.error`, `device.recovered`, `device.online`,
    /// `device.provisioning`, or `device.still_down` for a reminder.
    pub fn kind(&self) -> &'static str {
        if self.reminder.is_some() {
            return "device.still_down";
        }
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
                let behind = match &self.behind {
                    Some(behind) => format!(
                        "\n{} behind it unreachable: {}",
                        devices(behind.count),
                        listed(&behind.first, behind.count)
                    ),
                    None => String::new(),
                };
                format!("🔴 {id} is offline\n{last_seen}\nCause: {cause}{behind}")
            }
            "device.still_down" => {
                let status = self.event.status;
                format!(
                    "🔁 {id} is still {status} (reminder {})\nSince: {}",
                    self.reminder.unwrap_or(1),
                    at(self.event.changed_at)
                )
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

impl GroupNotice {
    pub fn new(
        member_kind: &str,
        group: Vec<(String, String)>,
        mut events: Vec<Notice>,
        dashboard: Option<&str>,
    ) -> Self {
        // Listed by id: a person scans a sorted list.
        events.sort_by(|a, b| a.event.device_id.cmp(&b.event.device_id));
        let dashboard_url = dashboard.map(|base| {
            let mut filters: Vec<String> = group.iter().map(|(k, v)| format!("{k}:{v}")).collect();
            filters.sort();
            let mut url = format!("{}/", base.trim_end_matches('/'));
            let mut query = Vec::new();
            if !filters.is_empty() {
                query.push(format!("label={}", encode(&filters.join(","))));
            }
            if let Some(status) = events.first().map(|n| n.event.status) {
                query.push(format!("status={status}"));
            }
            if !query.is_empty() {
                url.push('?');
                url.push_str(&query.join("&"));
            }
            url
        });
        Self {
            member_kind: member_kind.to_string(),
            count: events.len(),
            group: group.into_iter().collect(),
            dashboard_url,
            events,
        }
    }

    /// `devices.offline`, `devices.recovered`, ...: the members' kind, plural.
    pub fn kind(&self) -> String {
        format!(
            "devices.{}",
            self.member_kind
                .strip_prefix("device.")
                .unwrap_or(&self.member_kind)
        )
    }

    /// The JSON a webhook receives: the members' notices and their count.
    pub fn webhook_body(&self) -> String {
        let timestamp = self.events.first().map(|n| n.event.changed_at);
        serde_json::to_string(&serde_json::json!({
            "type": self.kind(),
            "timestamp": timestamp,
            "data": self,
        }))
        .unwrap_or_default()
    }

    /// One line for a person, and the link.
    pub fn text(&self) -> String {
        let what = match self.member_kind.as_str() {
            "device.offline" => "🔴 {} offline",
            "device.error" => "🟠 {} report an error",
            "device.recovered" => "🟢 {} back online",
            "device.online" => "🟢 {} online (first heartbeat)",
            "device.still_down" => "🔁 {} still down (reminder)",
            _ => "⚪ {} registered",
        }
        .replace("{}", &devices(self.count as u64));
        let at = if self.group.is_empty() {
            String::new()
        } else {
            let parts: Vec<String> = self.group.iter().map(|(k, v)| format!("{k} {v}")).collect();
            format!(" at {}", parts.join(", "))
        };
        let ids: Vec<crate::device::DeviceId> = self
            .events
            .iter()
            .take(crate::notify::policy::LISTED)
            .map(|n| n.event.device_id.clone())
            .collect();
        let link = self
            .dashboard_url
            .as_ref()
            .map(|url| format!("\n{url}"))
            .unwrap_or_default();
        format!("{what}{at}: {}{link}", listed(&ids, self.count as u64))
    }
}

/// `1 device`, `142 devices`.
fn devices(count: u64) -> String {
    if count == 1 {
        "1 device".to_string()
    } else {
        format!("{count} devices")
    }
}

/// `pump-1, pump-2, … (+137)`: the first ids of `count`.
fn listed(first: &[crate::device::DeviceId], count: u64) -> String {
    let names: Vec<&str> = first.iter().map(|id| id.as_str()).collect();
    let more = count.saturating_sub(names.len() as u64);
    if more == 0 {
        names.join(", ")
    } else {
        format!("{}, … (+{more})", names.join(", "))
    }
}

/// Percent-encodes a query value (labels may hold any printable text).
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~:,".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// What a sink sends: a notice, or a test message an operator asked for.
#[derive(Debug, Clone, Copy)]
pub enum Message<'a> {
    Notice(&'a Notice),
    Group(&'a GroupNotice),
    Test { sink: &'a str, at: Timestamp },
}

impl Message<'_> {
    pub fn webhook_body(&self) -> String {
        match self {
            Message::Notice(notice) => notice.webhook_body(),
            Message::Group(group) => group.webhook_body(),
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
            Message::Group(group) => group.text(),
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
            behind: None,
            reminder: None,
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
