//! Persistence: devices, their transitions and the outbox of status events, behind one
//! trait so SQLite (one machine) and PostgreSQL (several hubs) can each use their own
//! SQL.
//!
//! A backend only reads and writes. What a flush changes is decided by
//! [`crate::rules`] between the backend's read and its write, and which devices the
//! offline check takes by the transitions [`crate::rules::timeouts`] lists; no backend
//! has rules of its own. Every backend runs the same conformance suite
//! (`storage/conformance.rs`).

#[cfg(test)]
mod conformance;
#[cfg(test)]
mod notify_conformance;
#[cfg(test)]
mod silence_conformance;

mod error;
#[cfg(test)]
pub mod fake;
pub mod leader;
pub mod notifications;
pub mod postgres;
mod rows;
mod silences;
pub mod sqlite;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

pub use error::StoreError;
pub use notifications::NotificationStore;

use crate::clock::Timestamp;
use crate::credentials::CredentialHash;
use crate::deadline::Deadlines;
use crate::device::DeviceId;
use crate::event::{StatusEvent, StoredEvent};
use crate::labels::{LabelFilter, Labels};
use crate::registration::{NewDevices, Refusal};
use crate::silence::{NewSilence, Silence};
use crate::status::Status;
use crate::update::{DeviceUpdate, Report};

/// A device as stored.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
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
    /// That clock minus the hub's when the heartbeat arrived, in milliseconds.
    pub clock_skew_ms: Option<i64>,
    pub error: Option<String>,
    /// The device's own `offline_after`, set through the API (`None`: it has none).
    #[serde(with = "humantime_serde")]
    #[schema(value_type = Option<String>, example = "20s")]
    pub offline_after: Option<Duration>,
    /// The heartbeat interval the device declares (`interval` in its heartbeats).
    #[serde(with = "humantime_serde")]
    #[schema(value_type = Option<String>, example = "30s")]
    pub interval: Option<Duration>,
    /// When it goes offline if it stays silent: `last_seen_at` plus its
    /// `offline_after` (interface.md "Deadlines"). Only meaningful while it is online
    /// or in error.
    pub deadline_at: Option<Timestamp>,
    /// Its labels, from its heartbeats and the API.
    pub labels: Labels,
    /// The device it is reached through (a gateway), from its heartbeats and the API;
    /// `None`: it names none.
    pub parent: Option<DeviceId>,
    #[serde(flatten)]
    pub report: Report,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies a flush atomically, as [`crate::rules`] decides from the stored rows:
    /// rows and reported fields are written (a field an update leaves out keeps its
    /// stored value), and each transition's event is added to the outbox in the same
    /// transaction. Unknown devices are registered as [`crate::registration::admit`]
    /// decides under `new`; the refused ones are left out and returned.
    async fn apply(&self, updates: &[DeviceUpdate], new: NewDevices)
    -> Result<Applied, StoreError>;

    /// Takes every device in a watched status (online, error: the transitions of
    /// [`crate::rules::timeouts`]) whose deadline is before `now` offline, in one
    /// transaction, and returns their events; except a device whose `offline_after`
    /// has not yet passed since `heard_since` (the hub could not hear it before then:
    /// its grace). A device is taken by exactly one caller even when several run at
    /// once.
    async fn mark_offline(
        &self,
        now: Timestamp,
        heard_since: Timestamp,
    ) -> Result<Vec<StatusEvent>, StoreError>;

    /// Replaces a device's labels with `labels`; returns the device.
    /// [`StoreError::NotFound`] if it does not exist.
    async fn set_labels(&self, id: &DeviceId, labels: &Labels) -> Result<Device, StoreError>;

    /// Gives a device its own `offline_after` (`None` clears it) and moves its
    /// deadline accordingly; returns the device. [`StoreError::NotFound`] if it
    /// does not exist.
    async fn set_offline_after(
        &self,
        id: &DeviceId,
        offline_after: Option<Duration>,
    ) -> Result<Device, StoreError>;

    /// Names the device `id` is reached through (`None` clears it); returns the
    /// device. [`StoreError::NotFound`] if it does not exist. The parent need not
    /// exist; that it is not `id` itself is the caller's to check.
    async fn set_parent(
        &self,
        id: &DeviceId,
        parent: Option<&DeviceId>,
    ) -> Result<Device, StoreError>;

    /// How many devices name each of `parents` as theirs, in one grouped count over
    /// the parent index; parents without any are left out (their children's ids, a
    /// page at a time: [`DeviceQuery::parent`]).
    async fn count_children(
        &self,
        parents: &[DeviceId],
    ) -> Result<HashMap<DeviceId, u64>, StoreError>;

    /// The devices `ids` names, in one query (a few thousand ids at a time), in no
    /// particular order; ids of devices that do not exist are left out.
    async fn devices_by_id(&self, ids: &[DeviceId]) -> Result<Vec<Device>, StoreError>;

    /// Registers a device an operator expects (status provisioning), unless the store
    /// already holds `max_devices`.
    async fn register(
        &self,
        id: &DeviceId,
        now: Timestamp,
        max_devices: Option<u64>,
    ) -> Result<StatusEvent, StoreError>;

    /// Unpublished outbox entries after `after_seq`, oldest first.
    async fn unpublished(&self, after_seq: i64, limit: u32) -> Result<Vec<OutboxItem>, StoreError>;

    /// Records that the broker acknowledged these outbox entries.
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

    /// A page of devices in id order.
    async fn devices(&self, query: &DeviceQuery) -> Result<Vec<Device>, StoreError>;

    /// A page of a device's events, newest first, older than `before_seq`.
    async fn events(
        &self,
        id: &DeviceId,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError>;

    /// Devices per status.
    async fn summary(&self) -> Result<Summary, StoreError>;

    /// Forgets a device and its history, and queues the clearing of its retained
    /// status behind anything already in the outbox.
    async fn delete(&self, id: &DeviceId, now: Timestamp) -> Result<(), StoreError>;

    /// A trivial query: the database answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Gives a device a login credential for the embedded broker, replacing any
    /// earlier one (whose secret stops working). [`StoreError::NotFound`] if the
    /// device does not exist. Deleting the device deletes its credential.
    async fn set_credential(
        &self,
        id: &DeviceId,
        credential: &CredentialHash,
    ) -> Result<(), StoreError>;

    /// A device's credential, if it has one. Read on every device login to the
    /// embedded broker, so one primary-key lookup.
    async fn credential(&self, id: &DeviceId) -> Result<Option<CredentialHash>, StoreError>;

    /// Removes a device's credential, if any: it can no longer log in.
    /// [`StoreError::NotFound`] if the device does not exist.
    async fn revoke_credential(&self, id: &DeviceId) -> Result<(), StoreError>;

    /// Stores a silence (checked by [`NewSilence::parse`]) created at `now`.
    async fn create_silence(&self, new: &NewSilence, now: Timestamp)
    -> Result<Silence, StoreError>;

    /// Every silence whose `ends_at` is after `ending_after` (in force or still to
    /// come, when given the time now), by `starts_at` then id. One indexed range:
    /// the alert policy reads it on every pass.
    async fn silences(&self, ending_after: Timestamp) -> Result<Vec<Silence>, StoreError>;

    /// Ends a silence at `now` if it would end later: `ends_at` becomes the earlier
    /// of the two, and so does `starts_at` (a silence still to come ends empty,
    /// `starts_at = ends_at = now`, and stays listed as a record). Returns it;
    /// one already ended is returned as it is. [`StoreError::SilenceNotFound`] if
    /// there is no such silence.
    async fn expire_silence(&self, id: i64, now: Timestamp) -> Result<Silence, StoreError>;
}

/// What a flush did.
#[derive(Debug, Default, PartialEq)]
pub struct Applied {
    /// The transitions committed, in order.
    pub events: Vec<StatusEvent>,
    /// Unknown devices not registered, and why: their updates were left out.
    pub refused: Vec<(DeviceId, Refusal)>,
}

/// Which devices to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceQuery {
    pub status: Option<Status>,
    /// Only ids starting with this (case-sensitive).
    pub prefix: Option<String>,
    /// Only ids after this one: the cursor of the previous page.
    pub after: Option<DeviceId>,
    /// Only devices carrying every one of these labels.
    pub labels: Vec<LabelFilter>,
    /// Only the devices that name this one as their parent.
    pub parent: Option<DeviceId>,
    pub limit: u32,
}

/// Device counts per status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Summary {
    pub provisioning: u64,
    pub online: u64,
    pub offline: u64,
    pub error: u64,
}

impl Summary {
    pub fn total(&self) -> u64 {
        self.provisioning + self.online + self.offline + self.error
    }

    pub fn count(&self, status: Status) -> u64 {
        match status {
            Status::Provisioning => self.provisioning,
            Status::Online => self.online,
            Status::Offline => self.offline,
            Status::Error => self.error,
        }
    }

    fn slot(&mut self, status: Status) -> &mut u64 {
        match status {
            Status::Provisioning => &mut self.provisioning,
            Status::Online => &mut self.online,
            Status::Offline => &mut self.offline,
            Status::Error => &mut self.error,
        }
    }
}

/// The `reason` of a tombstone in the log of status events: the row that clears a
/// deleted device's retained status ([`OutboxEntry::Clear`]), in outbox order. No
/// [`crate::status::Reason`] has this word; tombstones are never shown as history.
pub(crate) const TOMBSTONE: &str = "deleted";

/// What the publisher sends for one outbox entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboxEntry {
    /// A status event, published retained.
    Status(StatusEvent),
    /// An empty retained message: the device was deleted.
    Clear(DeviceId),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxItem {
    pub seq: i64,
    pub entry: OutboxEntry,
}

/// The stores one database provides.
#[derive(Clone)]
pub struct Stores {
    pub devices: Arc<dyn Store>,
    pub notifications: Arc<dyn NotificationStore>,
    /// Which of the hubs sharing the database sends the outbox on.
    pub leadership: Arc<dyn leader::Leadership>,
}

/// Whether `url` names a backend this build has.
pub fn supported_url(url: &str) -> bool {
    url.starts_with("sqlite:") || url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// Opens the database `settings.url` names, runs its migrations, brings every
/// stored deadline in line with `deadlines`, and returns both stores.
pub async fn connect_all(
    settings: &crate::config::DatabaseSettings,
    deadlines: Deadlines,
) -> Result<Stores, StoreError> {
    let url = settings.url.as_str();
    if url.starts_with("sqlite:") {
        let store = Arc::new(sqlite::SqliteStore::open(url, deadlines).await?);
        Ok(Stores {
            devices: store.clone(),
            notifications: store,
            leadership: Arc::new(leader::Alone),
        })
    } else if supported_url(url) {
        let store = Arc::new(postgres::PgStore::open(url, settings.postgres(), deadlines).await?);
        let options = postgres::PgStore::options(url, settings.postgres())?;
        Ok(Stores {
            devices: store.clone(),
            notifications: store,
            leadership: Arc::new(postgres::leader::PgLeadership::new(options)),
        })
    } else {
        Err(StoreError::UnsupportedUrl(settings.redacted_url()))
    }
}

/// Opens the store `url` names, with default connection settings and deadlines, and
/// runs its migrations.
pub async fn connect(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    let settings = crate::config::DatabaseSettings {
        url: url.to_string(),
        ..crate::config::Settings::default().database
    };
    Ok(connect_all(&settings, Deadlines::default()).await?.devices)
}
