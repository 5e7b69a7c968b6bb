//! Status events: one per transition, the product's output (interface.md section 3).
//!
//! An event is created in the same database transaction as the transition it
//! describes, with its id, so publishing it again after a crash repeats the same id.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::clock::Timestamp;
use crate::device::DeviceId;
use crate::status::{Reason, Status, Transition};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StatusEvent {
    pub event_id: Uuid,
    pub device_id: DeviceId,
    pub status: Status,
    pub previous_status: Option<Status>,
    pub reason: Reason,
    pub last_seen_at: Option<Timestamp>,
    pub changed_at: Timestamp,
    /// For a transition to `error`: the device's error text as of the change. Kept with
    /// the event because the device's row moves on (a quick recovery clears it) before
    /// a sink or a subscriber reads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 1024)]
    pub error: Option<String>,
}

impl StatusEvent {
    /// A new event for `transition`, with a fresh time-ordered id and no error text.
    pub fn new(
        device_id: DeviceId,
        transition: Transition,
        last_seen_at: Option<Timestamp>,
        changed_at: Timestamp,
    ) -> Self {
        Self {
            event_id: Uuid::now_v7(),
            device_id,
            status: transition.to,
            previous_status: transition.from,
            reason: transition.reason,
            last_seen_at,
            changed_at,
            error: None,
        }
    }

    /// The JSON published on `devices/{id}/status`.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain fields into a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// An event as stored, with its position in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Commit order; the publisher sends events in this order.
    pub seq: i64,
    pub event: StatusEvent,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// pump-7, online since 10:00, gone offline at 10:03.
    fn offline_event() -> StatusEvent {
        StatusEvent {
            event_id: Uuid::nil(),
            device_id: DeviceId::parse("pump-7").expect("valid"),
            status: Status::Offline,
            previous_status: Some(Status::Online),
            reason: Reason::HeartbeatTimeout,
            last_seen_at: Some(Timestamp::parse_rfc3339("2026-11-22T10:00:00Z").expect("ts")),
            changed_at: Timestamp::parse_rfc3339("2026-11-22T10:03:00Z").expect("ts"),
            error: None,
        }
    }

    #[test]
    fn json_has_the_documented_shape() {
        let event = offline_event();
        let json: serde_json::Value = serde_json::from_slice(&event.to_json()).expect("json");
        assert_eq!(
            json,
            serde_json::json!({
                "event_id": "00000000-0000-0000-0000-000000000000",
                "device_id": "pump-7",
                "status": "offline",
                "previous_status": "online",
                "reason": "heartbeat_timeout",
                "last_seen_at": "2026-11-22T10:00:00.000Z",
                "changed_at": "2026-11-22T10:03:00.000Z"
            })
        );
        let back: StatusEvent = serde_json::from_value(json).expect("parses back");
        assert_eq!(back, event);
    }

    #[test]
    fn an_error_event_carries_its_text_and_others_leave_the_field_out() {
        let event = StatusEvent {
            status: Status::Error,
            reason: Reason::DeviceError,
            changed_at: Timestamp::parse_rfc3339("2026-11-22T10:00:00Z").expect("ts"),
            error: Some("disk full".into()),
            ..offline_event()
        };
        let json: serde_json::Value = serde_json::from_slice(&event.to_json()).expect("json");
        assert_eq!(
            json,
            serde_json::json!({
                "event_id": "00000000-0000-0000-0000-000000000000",
                "device_id": "pump-7",
                "status": "error",
                "previous_status": "online",
                "reason": "device_error",
                "last_seen_at": "2026-11-22T10:00:00.000Z",
                "changed_at": "2026-11-22T10:00:00.000Z",
                "error": "disk full"
            })
        );
        let back: StatusEvent = serde_json::from_value(json).expect("parses back");
        assert_eq!(back, event);
    }
}
