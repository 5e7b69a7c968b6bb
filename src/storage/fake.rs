//! A store in memory for unit tests of the parts above the store (the checker, the
//! heartbeat handler). It keeps only what those tests look at; the integration tests
//! run the real SQLite store.

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;

use super::{Applied, Device, DeviceQuery, OutboxItem, Store, StoreError, Summary};
use crate::clock::Timestamp;
use crate::credentials::CredentialHash;
use crate::device::DeviceId;
use crate::event::{StatusEvent, StoredEvent};
use crate::registration::NewDevices;
use crate::status::{Signal, Status, transition};
use crate::update::DeviceUpdate;

#[derive(Default)]
pub struct FakeStore {
    /// Online devices, their last_seen and offline_after; `mark_offline` takes the
    /// overdue ones, once, by the rule the real stores follow.
    pub watched: Mutex<Vec<(DeviceId, Timestamp, Duration)>>,
    /// `(now, heard_since)` of every offline pass.
    pub passes: Mutex<Vec<(Timestamp, Timestamp)>>,
    /// Devices taken offline, and when.
    pub taken: Mutex<Vec<(DeviceId, Timestamp)>>,
    /// Every batch `apply` committed.
    pub applied: Mutex<Vec<Vec<DeviceUpdate>>>,
    /// While set, `apply` fails with this message and commits nothing.
    pub failing: Mutex<Option<String>>,
    /// Calls of `apply`, failed ones included.
    pub attempts: Mutex<u32>,
    /// While set, `apply` never returns (a write lock held elsewhere, for ever).
    pub hanging: std::sync::atomic::AtomicBool,
    /// Silences, as the real stores keep them.
    pub silences: Mutex<Vec<crate::silence::Silence>>,
}

impl FakeStore {
    pub fn fail(&self, why: Option<&str>) {
        *self.failing.lock().expect("lock") = why.map(str::to_string);
    }

    /// Devices in committed batches, in commit order.
    pub fn committed_devices(&self) -> Vec<String> {
        self.applied
            .lock()
            .expect("lock")
            .iter()
            .flatten()
            .map(|u| u.device.to_string())
            .collect()
    }
}

#[async_trait]
impl Store for FakeStore {
    async fn apply(&self, updates: &[DeviceUpdate], _: NewDevices) -> Result<Applied, StoreError> {
        *self.attempts.lock().expect("lock") += 1;
        if self.hanging.load(std::sync::atomic::Ordering::Relaxed) {
            std::future::pending::<()>().await;
        }
        if let Some(why) = self.failing.lock().expect("lock").clone() {
            return Err(StoreError::Corrupt(why));
        }
        self.applied.lock().expect("lock").push(updates.to_vec());
        Ok(Applied::default())
    }

    async fn mark_offline(
        &self,
        now: Timestamp,
        heard_since: Timestamp,
    ) -> Result<Vec<StatusEvent>, StoreError> {
        self.passes.lock().expect("lock").push((now, heard_since));
        let mut watched = self.watched.lock().expect("lock");
        let (overdue, fine): (Vec<_>, Vec<_>) =
            watched.drain(..).partition(|(_, seen, offline_after)| {
                seen.saturating_add(*offline_after) < now
                    && heard_since.saturating_add(*offline_after) < now
            });
        *watched = fine;
        let timeout = transition(Some(Status::Online), Signal::Timeout).expect("transition");
        self.taken
            .lock()
            .expect("lock")
            .extend(overdue.iter().map(|(id, _, _)| (id.clone(), now)));
        Ok(overdue
            .into_iter()
            .map(|(id, seen, _)| StatusEvent::new(id, timeout, Some(seen), now))
            .collect())
    }

    async fn set_labels(
        &self,
        id: &DeviceId,
        _: &crate::labels::Labels,
    ) -> Result<Device, StoreError> {
        Err(StoreError::NotFound(id.clone()))
    }

    async fn set_offline_after(
        &self,
        id: &DeviceId,
        _: Option<Duration>,
    ) -> Result<Device, StoreError> {
        Err(StoreError::NotFound(id.clone()))
    }

    async fn set_parent(&self, id: &DeviceId, _: Option<&DeviceId>) -> Result<Device, StoreError> {
        Err(StoreError::NotFound(id.clone()))
    }

    async fn count_children(
        &self,
        _: &[DeviceId],
    ) -> Result<std::collections::HashMap<DeviceId, u64>, StoreError> {
        Ok(std::collections::HashMap::new())
    }

    async fn devices_by_id(&self, _: &[DeviceId]) -> Result<Vec<Device>, StoreError> {
        Ok(Vec::new())
    }

    async fn register(
        &self,
        _: &DeviceId,
        _: Timestamp,
        _: Option<u64>,
    ) -> Result<StatusEvent, StoreError> {
        Err(StoreError::Corrupt(
            "not supported by the fake store".into(),
        ))
    }

    async fn unpublished(&self, _: i64, _: u32) -> Result<Vec<OutboxItem>, StoreError> {
        Ok(Vec::new())
    }

    async fn mark_published(&self, _: &[i64], _: Timestamp) -> Result<(), StoreError> {
        Ok(())
    }

    async fn current_events(
        &self,
        _: Option<&DeviceId>,
        _: u32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        Ok(Vec::new())
    }

    async fn device(&self, _: &DeviceId) -> Result<Option<Device>, StoreError> {
        Ok(None)
    }

    async fn devices(&self, _: &DeviceQuery) -> Result<Vec<Device>, StoreError> {
        Ok(Vec::new())
    }

    async fn events(
        &self,
        _: &DeviceId,
        _: Option<i64>,
        _: u32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        Ok(Vec::new())
    }

    async fn summary(&self) -> Result<Summary, StoreError> {
        Ok(Summary::default())
    }

    async fn delete(&self, _: &DeviceId, _: Timestamp) -> Result<(), StoreError> {
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn set_credential(&self, id: &DeviceId, _: &CredentialHash) -> Result<(), StoreError> {
        Err(StoreError::NotFound(id.clone()))
    }

    async fn credential(&self, _: &DeviceId) -> Result<Option<CredentialHash>, StoreError> {
        Ok(None)
    }

    async fn revoke_credential(&self, id: &DeviceId) -> Result<(), StoreError> {
        Err(StoreError::NotFound(id.clone()))
    }

    async fn create_silence(
        &self,
        new: &crate::silence::NewSilence,
        now: Timestamp,
    ) -> Result<crate::silence::Silence, StoreError> {
        let mut silences = self.silences.lock().expect("lock");
        let silence = crate::silence::Silence {
            id: silences.len() as i64 + 1,
            matcher: new.matcher.clone(),
            starts_at: new.starts_at,
            ends_at: new.ends_at,
            comment: new.comment.clone(),
            created_at: now,
        };
        silences.push(silence.clone());
        Ok(silence)
    }

    async fn silences(
        &self,
        ending_after: Timestamp,
    ) -> Result<Vec<crate::silence::Silence>, StoreError> {
        let mut found: Vec<_> = self
            .silences
            .lock()
            .expect("lock")
            .iter()
            .filter(|s| s.ends_at > ending_after)
            .cloned()
            .collect();
        found.sort_by_key(|s| (s.starts_at, s.id));
        Ok(found)
    }

    async fn expire_silence(
        &self,
        id: i64,
        now: Timestamp,
    ) -> Result<crate::silence::Silence, StoreError> {
        let mut silences = self.silences.lock().expect("lock");
        let silence = silences
            .iter_mut()
            .find(|s| s.id == id)
            .ok_or(StoreError::SilenceNotFound(id))?;
        silence.ends_at = silence.ends_at.min(now);
        silence.starts_at = silence.starts_at.min(now);
        Ok(silence.clone())
    }
}
