//! Persistence: devices, their transitions and the outbox of status events, behind one
//! trait so SQLite (one machine) and PostgreSQL (several hubs) can each use their own
//! SQL. Each implementation applies the rules of [`crate::status::transition`]; none
//! has its own.

mod error;
pub mod sqlite;

use async_trait::async_trait;
use serde::Serialize;

pub use error::StoreError;

use crate::clock::Timestamp;
use crate::device::DeviceId;
use crate::event::{StatusEvent, StoredEvent};
use crate::heartbeat::Report;
use crate::heartbeat::batch::DeviceUpdate;
use crate::status::Status;

/// A device as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Device {
    pub device_id: DeviceId,
    pub status: Status,
    /// Hub clock at the latest heartbeat.
    pub last_seen_at: Option<Timestamp>,
    pub first_seen_at: Option<Timestamp>,
    pub status_changed_at: Timestamp,
    pub registered_at: Timestamp,
    /// The device's own clock in its latest heartbeat that carried one.
    pub device_time: Option<Timestamp>,
    pub error: Option<String>,
    #[serde(flatten)]
    pub report: Report,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies a flush atomically: every device's signals go through the status
    /// machine, rows and reported fields are written, and each transition's event is
    /// added to the outbox in the same transaction. Returns the new events.
    async fn apply(&self, updates: &[DeviceUpdate]) -> Result<Vec<StatusEvent>, StoreError>;

    /// Takes every online or error device last seen before `cutoff` offline, at `now`,
    /// in one transaction, and returns their events. A device is taken by exactly one
    /// caller even when several run at once.
    async fn mark_offline(
        &self,
        cutoff: Timestamp,
        now: Timestamp,
    ) -> Result<Vec<StatusEvent>, StoreError>;

    /// Registers a device an operator expects (status provisioning).
    async fn register(&self, id: &DeviceId, now: Timestamp) -> Result<StatusEvent, StoreError>;

    /// Unpublished events after `after_seq`, oldest first.
    async fn unpublished_events(
        &self,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError>;

    /// Records that the broker acknowledged these events.
    async fn mark_published(&self, seqs: &[i64], at: Timestamp) -> Result<(), StoreError>;

    /// The latest event of each device, by device id after `after`, if it has been
    /// published: the retained state of `devices/+/status`, a page at a time. A device
    /// whose latest event is still in the outbox is left to the outbox.
    async fn current_events(
        &self,
        after: Option<&DeviceId>,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError>;

    async fn device(&self, id: &DeviceId) -> Result<Option<Device>, StoreError>;

    /// Devices ordered by id, optionally of one status.
    async fn devices(&self, status: Option<Status>) -> Result<Vec<Device>, StoreError>;

    /// A device's events, newest first.
    async fn events(&self, id: &DeviceId, limit: u32) -> Result<Vec<StoredEvent>, StoreError>;
}

/// Opens the store `url` names and runs its migrations.
pub async fn connect(url: &str) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    if url.starts_with("sqlite:") {
        Ok(std::sync::Arc::new(
            sqlite::SqliteStore::connect(url).await?,
        ))
    } else {
        Err(StoreError::UnsupportedUrl(url.to_string()))
    }
}
