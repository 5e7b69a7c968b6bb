//! The notification queues of the sinks, behind their own trait: the device store
//! and this one are implemented by the same SQLite store, but the parts that use them
//! differ (the heartbeat path never touches notifications).

use async_trait::async_trait;

use super::StoreError;
use crate::clock::Timestamp;
use crate::device::DeviceId;
use crate::event::StoredEvent;

/// One notification as its sink sends it.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct Payload {
    pub device_id: DeviceId,
    /// The transition's event id: the idempotency key.
    pub event_id: uuid::Uuid,
    /// `device.offline`, `device.recovered`, ...
    pub kind: String,
    /// The request body (webhook JSON) or the text (Telegram, Slack).
    pub body: String,
}

/// A notification to queue for a sink.
#[derive(Debug, Clone, PartialEq)]
pub struct NewNotification {
    /// The transition's position in the event log.
    pub event_seq: i64,
    pub payload: Payload,
}

/// A queued notification.
#[derive(Debug, Clone, PartialEq)]
pub struct Queued {
    pub id: i64,
    pub payload: Payload,
    /// Attempts made so far.
    pub attempts: u32,
    pub created_at: Timestamp,
}

/// A notification given up on.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub id: i64,
    pub payload: Payload,
    pub attempts: u32,
    pub created_at: Timestamp,
    pub error: String,
}

/// What became of an attempt, to record.
#[derive(Debug, Clone, PartialEq)]
pub enum Settled {
    Delivered {
        id: i64,
    },
    Retry {
        id: i64,
        attempts: u32,
        next_attempt_at: Timestamp,
        error: String,
    },
    Dead {
        id: i64,
        attempts: u32,
        error: String,
    },
}

/// A sink's queue at a glance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub backlog: u64,
    pub oldest_pending: Option<Timestamp>,
    pub dead_letters: u64,
}

#[async_trait]
pub trait NotificationStore: Send + Sync + 'static {
    /// The sink's cursor in the event log and its run-time enabled override. A sink
    /// seen for the first time starts at the end of the log: it hears from now on.
    async fn sink_state(&self, sink: &str) -> Result<(i64, Option<bool>), StoreError>;

    /// Sets the run-time override; `skip_to_end`: move the cursor to the end of the
    /// log (a sink switched on hears from then on, not what it missed).
    async fn set_sink_enabled(
        &self,
        sink: &str,
        enabled: bool,
        skip_to_end: bool,
    ) -> Result<(), StoreError>;

    /// The position of the latest event in the log (0: none yet).
    async fn log_end(&self) -> Result<i64, StoreError>;

    /// Transitions after `after`, in commit order, at most `limit`; deletions left out.
    async fn events_after(&self, after: i64, limit: u32) -> Result<Vec<StoredEvent>, StoreError>;

    /// When `device`'s transition before `before_seq` happened.
    async fn previous_change(
        &self,
        device: &DeviceId,
        before_seq: i64,
    ) -> Result<Option<Timestamp>, StoreError>;

    /// Queues `items` and moves the sink's cursor from `from` to `to`, in one
    /// transaction. False (and nothing queued) if the cursor was no longer at `from`.
    async fn enqueue(
        &self,
        sink: &str,
        from: i64,
        to: i64,
        items: &[NewNotification],
        now: Timestamp,
    ) -> Result<bool, StoreError>;

    /// Up to `limit` notifications due at `now`, oldest first, none of them behind
    /// another pending one of the same device, none of `skip`.
    async fn due(
        &self,
        sink: &str,
        now: Timestamp,
        skip: &[i64],
        limit: u32,
    ) -> Result<Vec<Queued>, StoreError>;

    /// Records attempts' outcomes.
    async fn settle(&self, outcomes: &[Settled]) -> Result<(), StoreError>;

    /// Makes every pending notification of the sink due now (its receiver is back).
    async fn due_now(&self, sink: &str, now: Timestamp) -> Result<u64, StoreError>;

    async fn queue_stats(&self, sink: &str) -> Result<QueueStats, StoreError>;

    /// A page of dead letters, oldest first, after `after_id`.
    async fn dead_letters(
        &self,
        sink: &str,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, StoreError>;

    /// Puts dead letters (one, or all with `None`) back in the queue, due now.
    async fn retry_dead(
        &self,
        sink: &str,
        id: Option<i64>,
        now: Timestamp,
    ) -> Result<u64, StoreError>;

    /// Forgets dead letters (one, or all with `None`).
    async fn drop_dead(&self, sink: &str, id: Option<i64>) -> Result<u64, StoreError>;
}
