//! The heartbeat handler: the single writer of heartbeat state in a hub.
//!
//! It drains the bounded queue the subscriber fills, coalesces messages per device,
//! and commits a batch every `flush_interval`, when `max_batch` devices are pending,
//! when the offline checker asks, and at shutdown. A transition's event is committed
//! with the batch, before anything is published.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::{self, Instant, MissedTickBehavior};

use super::batch::Batch;
use super::{Inbound, Receipt};
use crate::alerts::AlertChannel;
use crate::device::DeviceId;
use crate::metrics::Metrics;
use crate::storage::Store;

/// Messages taken from the queue per wake-up.
const RECV_CHUNK: usize = 1024;
/// Attempts at the final flush during shutdown before giving up.
const FINAL_FLUSH_ATTEMPTS: u32 = 10;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlushError {
    #[error("the heartbeat handler has stopped")]
    Stopped,
    #[error("could not commit heartbeats: {0}")]
    Store(String),
}

/// Asks the handler to commit everything queued so far.
#[derive(Clone, Debug)]
pub struct FlushHandle(mpsc::Sender<Inbound>);

impl FlushHandle {
    pub fn new(queue: mpsc::Sender<Inbound>) -> Self {
        Self(queue)
    }

    /// Resolves once every message queued before this call is committed. The request
    /// travels the same queue as heartbeats, so nothing received earlier can be missed.
    pub async fn flush(&self) -> Result<(), FlushError> {
        let (reply, answer) = oneshot::channel();
        self.0
            .send(Inbound::Flush { reply })
            .await
            .map_err(|_| FlushError::Stopped)?;
        answer.await.map_err(|_| FlushError::Stopped)?
    }
}

pub struct HeartbeatHandler {
    store: Arc<dyn Store>,
    alerts: AlertChannel,
    metrics: Arc<Metrics>,
    batch: Batch,
    /// Heartbeats whose sender waits to hear they were committed.
    receipts: Vec<(DeviceId, Receipt)>,
    flush_interval: Duration,
    max_batch: usize,
}

impl HeartbeatHandler {
    pub fn new(
        store: Arc<dyn Store>,
        alerts: AlertChannel,
        metrics: Arc<Metrics>,
        flush_interval: Duration,
        max_batch: usize,
    ) -> Self {
        Self {
            store,
            alerts,
            metrics,
            batch: Batch::default(),
            receipts: Vec::new(),
            flush_interval,
            max_batch: max_batch.max(1),
        }
    }

    /// Runs until every sender of `queue` is gone, then commits what is left.
    pub async fn run(mut self, mut queue: mpsc::Receiver<Inbound>) {
        let mut ticker = time::interval(self.flush_interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut chunk = Vec::with_capacity(RECV_CHUNK);
        loop {
            tokio::select! {
                received = queue.recv_many(&mut chunk, RECV_CHUNK) => {
                    if received == 0 {
                        break;
                    }
                    self.metrics.queue_depth.store(queue.len() as u64, Relaxed);
                    for message in chunk.drain(..) {
                        self.take(message).await;
                    }
                    if self.batch.len() >= self.max_batch {
                        // A failure is logged and the batch kept for the next attempt.
                        let _ = self.flush().await;
                    }
                }
                _ = ticker.tick() => {
                    let _ = self.flush().await;
                }
            }
        }
        self.final_flush().await;
    }

    async fn take(&mut self, message: Inbound) {
        match message {
            Inbound::Heartbeat {
                device,
                at,
                heartbeat,
                receipt,
            } => {
                if let Some(receipt) = receipt {
                    self.receipts.push((device.clone(), receipt));
                }
                self.batch.add_heartbeat(device, at, *heartbeat);
            }
            Inbound::ConnectionLost { device, at } => self.batch.add_connection_lost(device, at),
            Inbound::Flush { reply } => {
                let result = self.flush().await;
                // The asker may have given up; nothing to do then.
                let _ = reply.send(result);
            }
        }
    }

    async fn flush(&mut self) -> Result<(), FlushError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let messages = self.batch.messages() as u64;
        let updates = self.batch.take();
        let started = Instant::now();
        match self.store.apply(&updates).await {
            Ok(events) => {
                self.metrics.flush.observe_duration(started.elapsed());
                self.metrics.batch_rows.observe(updates.len() as u64);
                self.metrics.flush_messages.fetch_add(messages, Relaxed);
                tracing::trace!(
                    devices = updates.len(),
                    messages,
                    transitions = events.len(),
                    elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                    "batch committed"
                );
                self.alerts.committed(&events);
                if !self.receipts.is_empty() {
                    let registered: HashSet<&DeviceId> = events
                        .iter()
                        .filter(|e| e.previous_status.is_none())
                        .map(|e| &e.device_id)
                        .collect();
                    for (device, receipt) in self.receipts.drain(..) {
                        let _ = receipt.send(Ok(registered.contains(&device)));
                    }
                }
                Ok(())
            }
            Err(e) => {
                self.metrics.flush_errors.fetch_add(1, Relaxed);
                tracing::error!(error = %e, devices = updates.len(), "could not commit heartbeats; keeping them for the next flush");
                self.batch.restore(updates);
                Err(FlushError::Store(e.to_string()))
            }
        }
    }

    async fn final_flush(&mut self) {
        for attempt in 1..=FINAL_FLUSH_ATTEMPTS {
            if self.flush().await.is_ok() {
                return;
            }
            time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
        }
        tracing::error!(
            devices = self.batch.len(),
            "gave up committing heartbeats at shutdown"
        );
    }
}
