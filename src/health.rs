//! What the hub knows about its own ability to do its job right now.
//!
//! The parts that do the work report here: [`RecordWrites`] (around the store) the
//! outcome of every write, the heartbeat handler what it holds uncommitted, the status
//! publisher its backlog, the MQTT subscriber whether it listens. `/healthz`, `/readyz`
//! and `/metrics` only read. A `SELECT 1` is not enough: with a full disk every read
//! answers while every write fails, and the hub must say so.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::checker::Listening;
use crate::clock::Timestamp;
use crate::credentials::CredentialHash;
use crate::device::DeviceId;
use crate::event::{StatusEvent, StoredEvent};
use crate::mqtt::broker;
use crate::registration::NewDevices;
use crate::storage::{Applied, Device, DeviceQuery, OutboxItem, Store, StoreError, Summary};
use crate::update::DeviceUpdate;

/// How long a broker probe result is reused: health checks may come often.
const PROBE_CACHE: Duration = Duration::from_secs(1);

/// When the hub stops calling itself healthy.
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    /// A received heartbeat uncommitted for longer than this: the database is not
    /// keeping up (or not taking writes).
    pub commit_lag: Duration,
    /// Status events waiting this long without the broker acknowledging any.
    pub publish_lag: Duration,
}

pub struct Health {
    thresholds: Thresholds,
    /// Per continuous writer, the error of its latest write if that failed. Kept per
    /// writer: during a full disk one kind of write can fit in a page already there
    /// while another fails, and one success must not hide the other's failure.
    write_failure: Mutex<[Option<String>; Writer::COUNT]>,
    write_failures: AtomicU64,
    /// Since when the handler has held a heartbeat it has not committed.
    uncommitted_since: Mutex<Option<Instant>>,
    uncommitted_devices: AtomicU64,
    /// Since when status events have waited without any being acknowledged.
    events_waiting_since: Mutex<Option<Instant>>,
    events_pending: AtomicU64,
    /// The hub's own subscription, for either kind of broker.
    listening: Listening,
    /// The embedded broker, probed through a real MQTT round trip with these options.
    embedded: Option<rumqttc::MqttOptions>,
    last_probe: tokio::sync::Mutex<Option<(Instant, Result<(), String>)>>,
}

impl Health {
    pub fn new(
        thresholds: Thresholds,
        listening: Listening,
        embedded: Option<rumqttc::MqttOptions>,
    ) -> Self {
        Self {
            thresholds,
            write_failure: Mutex::new(Default::default()),
            write_failures: AtomicU64::new(0),
            uncommitted_since: Mutex::new(None),
            uncommitted_devices: AtomicU64::new(0),
            events_waiting_since: Mutex::new(None),
            events_pending: AtomicU64::new(0),
            listening,
            embedded,
            last_probe: tokio::sync::Mutex::new(None),
        }
    }

    fn write_succeeded(&self, writer: Writer) {
        if let Ok(mut failures) = self.write_failure.lock() {
            failures[writer as usize] = None;
        }
    }

    fn write_failed(&self, writer: Writer, error: &StoreError) {
        self.write_failures.fetch_add(1, Relaxed);
        if let Ok(mut failures) = self.write_failure.lock() {
            failures[writer as usize] = Some(error.to_string());
        }
    }

    fn failing_write(&self) -> Option<String> {
        let failures = self.write_failure.lock().ok()?;
        failures.iter().flatten().next().cloned()
    }

    /// The heartbeat handler holds `devices` devices' heartbeats uncommitted, the
    /// oldest received at `since` (`None`: nothing held).
    pub fn uncommitted(&self, devices: usize, since: Option<Instant>) {
        self.uncommitted_devices.store(devices as u64, Relaxed);
        if let Ok(mut slot) = self.uncommitted_since.lock() {
            *slot = since;
        }
    }

    /// The publisher has `pending` events to deliver; `progressed`: the broker has
    /// just acknowledged one.
    pub fn events(&self, pending: usize, progressed: bool) {
        self.events_pending.store(pending as u64, Relaxed);
        if let Ok(mut since) = self.events_waiting_since.lock() {
            if pending == 0 {
                *since = None;
            } else if progressed || since.is_none() {
                *since = Some(Instant::now());
            }
        }
    }

    fn uncommitted_age(&self) -> Option<Duration> {
        let since = self.uncommitted_since.lock().ok().and_then(|s| *s)?;
        Some(since.elapsed())
    }

    fn events_waiting(&self) -> Option<Duration> {
        let since = self.events_waiting_since.lock().ok().and_then(|s| *s)?;
        Some(since.elapsed())
    }

    /// Whether writes are being committed: none failed since the last success, and no
    /// heartbeat has waited longer than the threshold.
    pub fn writes(&self) -> Result<(), String> {
        if let Some(error) = self.failing_write() {
            return Err(format!("writes are failing: {error}"));
        }
        match self.uncommitted_age() {
            Some(age) if age > self.thresholds.commit_lag => Err(format!(
                "heartbeats of {} devices uncommitted for {:.1} s",
                self.uncommitted_devices.load(Relaxed),
                age.as_secs_f64()
            )),
            _ => Ok(()),
        }
    }

    /// Whether status events reach the broker.
    pub fn publisher(&self) -> Result<(), String> {
        match self.events_waiting() {
            Some(waiting) if waiting > self.thresholds.publish_lag => Err(format!(
                "{} status events waiting, none acknowledged by the broker for {:.1} s",
                self.events_pending.load(Relaxed),
                waiting.as_secs_f64()
            )),
            _ => Ok(()),
        }
    }

    /// Whether the hub hears devices: subscribed, and for the embedded broker, a real
    /// MQTT round trip through it works.
    pub async fn broker(&self) -> Result<(), String> {
        if self.listening.borrow().is_none() {
            return Err("the hub is not subscribed to the broker".into());
        }
        let Some(options) = &self.embedded else {
            return Ok(());
        };
        // One probe at a time (they share a client id) and not more than once a second.
        let mut last = self.last_probe.lock().await;
        if let Some((at, result)) = last.as_ref()
            && at.elapsed() < PROBE_CACHE
        {
            return result.clone();
        }
        let result = broker::probe(options.clone())
            .await
            .map_err(|e| format!("embedded broker: {e}"));
        *last = Some((Instant::now(), result.clone()));
        result
    }

    /// The Prometheus lines for what is tracked here.
    pub fn render_metrics(&self, out: &mut String) {
        let gauge = |out: &mut String, name: &str, help: &str, value: f64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        };
        gauge(
            out,
            "fleetwatch_uncommitted_devices",
            "Devices whose received heartbeats are not yet committed.",
            self.uncommitted_devices.load(Relaxed) as f64,
        );
        gauge(
            out,
            "fleetwatch_uncommitted_age_seconds",
            "Age of the oldest received heartbeat not yet committed (0 when none).",
            self.uncommitted_age().map_or(0.0, |age| age.as_secs_f64()),
        );
        gauge(
            out,
            "fleetwatch_database_write_failing",
            "1 while the latest database write failed, 0 once one succeeds.",
            f64::from(u8::from(self.failing_write().is_some())),
        );
        let _ = writeln!(
            out,
            "# HELP fleetwatch_database_write_errors_total Database writes that failed.\n\
             # TYPE fleetwatch_database_write_errors_total counter\n\
             fleetwatch_database_write_errors_total {}",
            self.write_failures.load(Relaxed)
        );
        gauge(
            out,
            "fleetwatch_events_pending",
            "Status events committed and not yet acknowledged by the broker.",
            self.events_pending.load(Relaxed) as f64,
        );
        gauge(
            out,
            "fleetwatch_events_waiting_seconds",
            "How long pending status events have waited without an acknowledgement (0 when none).",
            self.events_waiting().map_or(0.0, |age| age.as_secs_f64()),
        );
    }
}

/// A failure that repeats every few hundred milliseconds while it lasts (a database
/// that takes no writes, say): worth one line when it starts and one when it ends,
/// not one per attempt.
#[derive(Debug, Default)]
pub(crate) struct Outage {
    since: Option<Instant>,
}

impl Outage {
    /// Records a failure; true if it is the first of an outage (log it).
    pub(crate) fn failed(&mut self) -> bool {
        if self.since.is_some() {
            return false;
        }
        self.since = Some(Instant::now());
        true
    }

    /// Records a success; how long the outage lasted if one just ended.
    pub(crate) fn ended(&mut self) -> Option<Duration> {
        self.since.take().map(|since| since.elapsed())
    }
}

/// The hub's continuous writers, each with its own failure state.
#[derive(Debug, Clone, Copy)]
enum Writer {
    Heartbeats,
    OfflineCheck,
    Publisher,
}

impl Writer {
    const COUNT: usize = 3;
}

/// A store that reports the outcome of the continuous writes to [`Health`]. Reads are not
/// recorded: `/healthz` pings the database for those.
pub struct RecordWrites {
    inner: Arc<dyn Store>,
    health: Arc<Health>,
}

impl RecordWrites {
    pub fn new(inner: Arc<dyn Store>, health: Arc<Health>) -> Self {
        Self { inner, health }
    }

    /// Records the outcome of one of the writes the hub makes all the time. A refusal
    /// (not found, exists) says nothing either way. The operators' occasional writes
    /// (register, delete) are not recorded: their caller hears the error, and a
    /// failure that no later call clears would stick.
    fn record<T>(&self, writer: Writer, result: Result<T, StoreError>) -> Result<T, StoreError> {
        match &result {
            Ok(_) => self.health.write_succeeded(writer),
            Err(e) if e.is_fault() => self.health.write_failed(writer, e),
            Err(_) => {}
        }
        result
    }
}

#[async_trait]
impl Store for RecordWrites {
    async fn apply(
        &self,
        updates: &[DeviceUpdate],
        new: NewDevices,
    ) -> Result<Applied, StoreError> {
        self.record(Writer::Heartbeats, self.inner.apply(updates, new).await)
    }

    async fn mark_offline(
        &self,
        now: Timestamp,
        heard_since: Timestamp,
    ) -> Result<Vec<StatusEvent>, StoreError> {
        self.record(
            Writer::OfflineCheck,
            self.inner.mark_offline(now, heard_since).await,
        )
    }

    async fn set_labels(
        &self,
        id: &DeviceId,
        labels: &crate::labels::Labels,
    ) -> Result<Device, StoreError> {
        self.inner.set_labels(id, labels).await
    }

    async fn set_offline_after(
        &self,
        id: &DeviceId,
        offline_after: Option<std::time::Duration>,
    ) -> Result<Device, StoreError> {
        self.inner.set_offline_after(id, offline_after).await
    }

    async fn set_parent(
        &self,
        id: &DeviceId,
        parent: Option<&DeviceId>,
    ) -> Result<Device, StoreError> {
        self.inner.set_parent(id, parent).await
    }

    async fn count_children(
        &self,
        parents: &[DeviceId],
    ) -> Result<std::collections::HashMap<DeviceId, u64>, StoreError> {
        self.inner.count_children(parents).await
    }

    async fn devices_by_id(&self, ids: &[DeviceId]) -> Result<Vec<Device>, StoreError> {
        self.inner.devices_by_id(ids).await
    }

    async fn register(
        &self,
        id: &DeviceId,
        now: Timestamp,
        max_devices: Option<u64>,
    ) -> Result<StatusEvent, StoreError> {
        self.inner.register(id, now, max_devices).await
    }

    async fn unpublished(&self, after_seq: i64, limit: u32) -> Result<Vec<OutboxItem>, StoreError> {
        self.inner.unpublished(after_seq, limit).await
    }

    async fn mark_published(&self, seqs: &[i64], at: Timestamp) -> Result<(), StoreError> {
        self.record(Writer::Publisher, self.inner.mark_published(seqs, at).await)
    }

    async fn current_events(
        &self,
        after: Option<&DeviceId>,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner.current_events(after, limit).await
    }

    async fn device(&self, id: &DeviceId) -> Result<Option<Device>, StoreError> {
        self.inner.device(id).await
    }

    async fn devices(&self, query: &DeviceQuery) -> Result<Vec<Device>, StoreError> {
        self.inner.devices(query).await
    }

    async fn events(
        &self,
        id: &DeviceId,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner.events(id, before_seq, limit).await
    }

    async fn summary(&self) -> Result<Summary, StoreError> {
        self.inner.summary().await
    }

    async fn delete(&self, id: &DeviceId, now: Timestamp) -> Result<(), StoreError> {
        self.inner.delete(id, now).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }

    // Not among the writes health tracks: an operator's request, answered on its own.
    async fn set_credential(
        &self,
        id: &DeviceId,
        credential: &CredentialHash,
    ) -> Result<(), StoreError> {
        self.inner.set_credential(id, credential).await
    }

    async fn credential(&self, id: &DeviceId) -> Result<Option<CredentialHash>, StoreError> {
        self.inner.credential(id).await
    }

    async fn revoke_credential(&self, id: &DeviceId) -> Result<(), StoreError> {
        self.inner.revoke_credential(id).await
    }

    async fn create_silence(
        &self,
        new: &crate::silence::NewSilence,
        now: Timestamp,
    ) -> Result<crate::silence::Silence, StoreError> {
        self.inner.create_silence(new, now).await
    }

    async fn silences(
        &self,
        ending_after: Timestamp,
    ) -> Result<Vec<crate::silence::Silence>, StoreError> {
        self.inner.silences(ending_after).await
    }

    async fn expire_silence(
        &self,
        id: i64,
        now: Timestamp,
    ) -> Result<crate::silence::Silence, StoreError> {
        self.inner.expire_silence(id, now).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::fake::FakeStore;

    fn health() -> Arc<Health> {
        Arc::new(Health::new(
            Thresholds {
                commit_lag: Duration::from_secs(10),
                publish_lag: Duration::from_secs(30),
            },
            tokio::sync::watch::channel(None).1,
            None,
        ))
    }

    #[tokio::test]
    async fn a_failed_write_is_unhealthy_until_the_next_write_succeeds() {
        let health = health();
        let fake = Arc::new(FakeStore::default());
        let store = RecordWrites::new(fake.clone(), Arc::clone(&health));
        fake.fail(Some("disk full"));
        assert!(store.apply(&[], NewDevices::UNLIMITED).await.is_err());
        let error = health.writes().expect_err("unhealthy");
        assert!(error.contains("disk full"), "{error}");
        // A read works on a full disk; it proves nothing about writes.
        store.summary().await.expect("read");
        assert!(health.writes().is_err());
        // Another writer's success does not hide it.
        store
            .mark_published(&[1], Timestamp::from_unix_millis(1))
            .await
            .expect("write");
        assert!(health.writes().is_err());
        fake.fail(None);
        store
            .apply(&[], NewDevices::UNLIMITED)
            .await
            .expect("write");
        assert_eq!(health.writes(), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_held_past_the_commit_lag_are_unhealthy() {
        let health = health();
        health.uncommitted(3, Some(Instant::now()));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(health.writes(), Ok(()));
        tokio::time::advance(Duration::from_millis(1)).await;
        let error = health.writes().expect_err("unhealthy");
        assert!(error.contains("3 devices"), "{error}");
        health.uncommitted(0, None);
        assert_eq!(health.writes(), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn events_without_an_acknowledgement_past_the_publish_lag_are_unhealthy() {
        let health = health();
        health.events(5, false);
        tokio::time::advance(Duration::from_secs(20)).await;
        // An acknowledgement is progress, even with events still waiting.
        health.events(4, true);
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(health.publisher(), Ok(()));
        health.events(4, false);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(health.publisher().is_err());
        health.events(0, false);
        assert_eq!(health.publisher(), Ok(()));
        let mut text = String::new();
        health.render_metrics(&mut text);
        assert!(text.contains("fleetwatch_events_pending 0\n"), "{text}");
    }
}
