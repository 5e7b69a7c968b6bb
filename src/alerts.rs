//! The alert channel: where committed transitions go next.
//!
//! Producers (the heartbeat handler, the offline checker) call
//! [`AlertChannel::committed`] after their transaction commits. It logs each
//! transition, counts it, and wakes the sinks, which read the durable outbox rather
//! than this call, so an event committed just before a crash is still delivered.

use std::sync::Arc;

use tokio::sync::Notify;

use crate::event::StatusEvent;
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct AlertChannel {
    metrics: Arc<Metrics>,
    outbox_changed: Arc<Notify>,
}

impl AlertChannel {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            outbox_changed: Arc::new(Notify::new()),
        }
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
        }
        if !events.is_empty() {
            self.outbox_changed.notify_one();
        }
    }
}
