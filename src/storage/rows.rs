//! Reading stored rows into the store's types, once for every backend.
//!
//! The backends store the same columns in their own types (SQLite: times as Unix
//! milliseconds, ids and JSON as text; PostgreSQL: `timestamptz`, `uuid`, `jsonb`). A
//! backend says how it reads one column of each kind ([`Columns`]); what a device, an
//! event or a notification is made of is said here, so the two cannot drift.

use uuid::Uuid;

use super::notifications::Payload;
use super::{Device, OutboxEntry, OutboxItem, StoreError, TOMBSTONE};
use crate::clock::Timestamp;
use crate::deadline;
use crate::device::DeviceId;
use crate::event::{StatusEvent, StoredEvent};
use crate::status::Status;
use crate::update::{DeviceUpdate, Report};

/// How a backend reads a column of each kind from one of its rows, by name.
pub(crate) trait Columns {
    fn text(&self, column: &str) -> Result<Option<String>, StoreError>;
    fn int(&self, column: &str) -> Result<Option<i64>, StoreError>;
    fn time(&self, column: &str) -> Result<Option<Timestamp>, StoreError>;
    fn uuid(&self, column: &str) -> Result<Option<Uuid>, StoreError>;

    fn required<T>(&self, column: &str, value: Option<T>) -> Result<T, StoreError> {
        value.ok_or_else(|| corrupt(format!("{column} is NULL")))
    }

    fn required_text(&self, column: &str) -> Result<String, StoreError> {
        self.required(column, self.text(column)?)
    }

    fn required_int(&self, column: &str) -> Result<i64, StoreError> {
        self.required(column, self.int(column)?)
    }

    fn required_time(&self, column: &str) -> Result<Timestamp, StoreError> {
        self.required(column, self.time(column)?)
    }

    fn status(&self, column: &str) -> Result<Status, StoreError> {
        self.required_text(column)?.parse().map_err(corrupt)
    }

    fn device_id(&self, column: &str) -> Result<DeviceId, StoreError> {
        let text = self.required_text(column)?;
        DeviceId::parse(&text).map_err(|e| corrupt(format!("device id {text:?}: {e}")))
    }

    fn optional_device_id(&self, column: &str) -> Result<Option<DeviceId>, StoreError> {
        self.text(column)?
            .map(|text| {
                DeviceId::parse(&text).map_err(|e| corrupt(format!("{column} {text:?}: {e}")))
            })
            .transpose()
    }

    /// A non-negative counter; a stored negative (which no write makes) reads as 0.
    fn unsigned(&self, column: &str) -> Result<Option<u64>, StoreError> {
        Ok(self.int(column)?.map(|v| u64::try_from(v).unwrap_or(0)))
    }

    fn json<T: serde::de::DeserializeOwned>(&self, column: &str) -> Result<Option<T>, StoreError> {
        self.text(column)?
            .map(|text| serde_json::from_str(&text).map_err(|e| corrupt(format!("{column}: {e}"))))
            .transpose()
    }
}

pub(crate) fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

/// A counter as a signed 64-bit column: a reported value past `i64::MAX` is clamped.
pub(crate) fn clamp(value: Option<u64>) -> Option<i64> {
    value.map(|v| i64::try_from(v).unwrap_or(i64::MAX))
}

/// A row of `status_events` (every column but `published_at`).
pub(crate) fn stored_event(row: &impl Columns) -> Result<StoredEvent, StoreError> {
    Ok(StoredEvent {
        seq: row.required_int("seq")?,
        event: StatusEvent {
            event_id: row.required("event_id", row.uuid("event_id")?)?,
            device_id: row.device_id("device_id")?,
            status: row.status("status")?,
            previous_status: row
                .text("previous_status")?
                .map(|p| p.parse())
                .transpose()
                .map_err(corrupt)?,
            reason: row.required_text("reason")?.parse().map_err(corrupt)?,
            last_seen_at: row.time("last_seen_at")?,
            changed_at: row.required_time("changed_at")?,
            error: row.text("error")?,
        },
    })
}

/// A row of `status_events` as the publisher sends it: a tombstone clears.
pub(crate) fn outbox_item(row: &impl Columns) -> Result<OutboxItem, StoreError> {
    let seq = row.required_int("seq")?;
    let entry = if row.required_text("reason")? == TOMBSTONE {
        OutboxEntry::Clear(row.device_id("device_id")?)
    } else {
        OutboxEntry::Status(stored_event(row)?.event)
    };
    Ok(OutboxItem { seq, entry })
}

/// A row of `devices`.
pub(crate) fn device(row: &impl Columns) -> Result<Device, StoreError> {
    Ok(Device {
        device_id: row.device_id("device_id")?,
        status: row.status("status")?,
        last_seen_at: row.time("last_seen_at")?,
        first_seen_at: row.time("first_seen_at")?,
        status_changed_at: row.required_time("status_changed_at")?,
        registered_at: row.required_time("registered_at")?,
        device_time: row.time("device_time")?,
        clock_skew_ms: row.int("clock_skew_ms")?,
        error: row.text("error")?,
        offline_after: row.int("offline_after_ms")?.map(deadline::from_millis),
        interval: row.int("interval_ms")?.map(deadline::from_millis),
        deadline_at: row.time("deadline_at")?,
        labels: row.json("labels")?.unwrap_or_default(),
        parent: row.optional_device_id("parent")?,
        report: Report {
            uptime_seconds: row.unsigned("uptime_seconds")?,
            free_memory: row.unsigned("free_memory")?,
            firmware_version: row.text("firmware_version")?,
            hostname: row.text("hostname")?,
            os_info: row.json("os_info")?,
            metrics: row.json("metrics")?,
        },
    })
}

/// A [`DeviceUpdate::parent`] as the one nullable text column the write statements
/// take: NULL keeps the stored parent, `''` clears it (no device id is empty), an id
/// sets it. The statements spell it `CASE WHEN p IS NULL THEN devices.parent ELSE
/// nullif(p, '') END`, so a heartbeat that names no parent costs one NULL.
pub(crate) fn parent_change(update: &DeviceUpdate) -> Option<&str> {
    update
        .parent
        .as_ref()
        .map(|parent| parent.as_ref().map_or("", DeviceId::as_str))
}

/// The payload columns of a row of `notifications`.
pub(crate) fn payload(row: &impl Columns) -> Result<Payload, StoreError> {
    Ok(Payload {
        device_id: row.device_id("device_id")?,
        event_id: row.required("event_id", row.uuid("event_id")?)?,
        kind: row.required_text("kind")?,
        body: row.required_text("body")?,
    })
}

/// A notification's `attempts`.
pub(crate) fn attempts(row: &impl Columns) -> Result<u32, StoreError> {
    Ok(u32::try_from(row.required_int("attempts")?).unwrap_or(u32::MAX))
}
