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
}

impl AlertChannel {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            outbox_changed: Arc::new(Notify::new()),
            live: broadcast::channel(LIVE_BUFFER).0,
            sinks: None,
        }
    }

    /// Also wakes the notification sinks after each commit.
    pub fn with_sinks(mut self, sinks: Arc<Sinks>) -> Self {
        self.sinks = Some(sinks);
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
            if self.live.receiver_count() > 0 {
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
