//! The alert channel: where committed transitions go next.
//!
//! Producers (the heartbeat handler, the offline checker, the HTTP API) call
//! [`AlertChannel::committed`] after their transaction commits. It logs each
//! transition, counts it, and wakes the sinks. Durable sinks (the MQTT publisher) read
//! the outbox rather than this call, so an event committed just before a crash is
//! still delivered; live views (the dashboard) subscribe to [`AlertChannel::live`],
//! which drops what a slow viewer cannot keep up with and tells it to reload.

use std::sync::Arc;

use tokio::sync::{Notify, broadcast};

use crate::device::DeviceId;
use crate::event::StatusEvent;
use crate::metrics::Metrics;
use crate::notify::Sinks;
use crate::storage::NotificationStore;

/// Live updates kept for a slow viewer before it is told it missed some.
const LIVE_BUFFER: usize = 4096;

/// What live viewers are told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveUpdate {
    Status(StatusEvent),
    Deleted(DeviceId),
}

#[derive(Clone)]
pub struct AlertChannel {
    metrics: Arc<Metrics>,
    outbox_changed: Arc<Notify>,
    live: broadcast::Sender<LiveUpdate>,
    sinks: Option<Arc<Sinks>>,
    /// Live status updates come from following the event log (several hubs share it:
    /// each hub's viewers see every hub's transitions), not from this hub's commits.
    live_from_log: bool,
}

impl AlertChannel {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            outbox_changed: Arc::new(Notify::new()),
            live: broadcast::channel(LIVE_BUFFER).0,
            sinks: None,
            live_from_log: false,
        }
    }

    /// Also wakes the notification sinks after each commit.
    pub fn with_sinks(mut self, sinks: Arc<Sinks>) -> Self {
        self.sinks = Some(sinks);
        self
    }

    /// Live status updates will come from [`follow_log`], not from [`Self::committed`].
    pub fn with_live_from_log(mut self) -> Self {
        self.live_from_log = true;
        self
    }

    /// A stream of updates from now on.
    pub fn live(&self) -> broadcast::Receiver<LiveUpdate> {
        self.live.subscribe()
    }

    /// A device was deleted: its tombstone is in the outbox.
    pub fn deleted(&self, device: DeviceId) {
        tracing::info!(device_id = %device, "device deleted");
        self.outbox_changed.notify_one();
        // Nobody watching is fine.
        let _ = self.live.send(LiveUpdate::Deleted(device));
    }

    /// Notified whenever new events are committed to the outbox.
    pub fn outbox_changed(&self) -> Arc<Notify> {
        Arc::clone(&self.outbox_changed)
    }

    pub fn committed(&self, events: &[StatusEvent]) {
        for event in events {
            self.metrics.transition(event.status);
            tracing::info!(
                device_id = %event.device_id,
                status = %event.status,
                previous_status = event.previous_status.map(|s| s.as_str()),
                reason = %event.reason,
                last_seen_at = event.last_seen_at.map(|t| t.to_rfc3339()),
                event_id = %event.event_id,
                "device status changed"
            );
            if !self.live_from_log && self.live.receiver_count() > 0 {
                let _ = self.live.send(LiveUpdate::Status(event.clone()));
            }
        }
        if !events.is_empty() {
            self.outbox_changed.notify_one();
            if let Some(sinks) = &self.sinks {
                sinks.wake();
            }
        }
    }
}

/// Events read from the log per page while following it.
const FOLLOW_PAGE: u32 = 1024;

/// Feeds live viewers every transition any hub commits, in commit order: reads the log
/// from its end at start, again whenever `changed` is notified (another hub's commit,
/// or this one's), and at least every second, until the task is dropped.
pub async fn follow_log(
    log: Arc<dyn NotificationStore>,
    alerts: AlertChannel,
    changed: Arc<Notify>,
) {
    let mut cursor = None;
    loop {
        let read = match cursor {
            None => log.log_end().await.map(|end| {
                cursor = Some(end);
                false
            }),
            Some(after) => log.events_after(after, FOLLOW_PAGE).await.map(|page| {
                for stored in &page {
                    if alerts.live.receiver_count() > 0 {
                        let _ = alerts.live.send(LiveUpdate::Status(stored.event.clone()));
                    }
                    cursor = Some(stored.seq);
                }
                page.len() == FOLLOW_PAGE as usize
            }),
        };
        match read {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => tracing::debug!(error = %e, "could not read the event log for live views"),
        }
        tokio::select! {
            () = changed.notified() => {}
            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
}
