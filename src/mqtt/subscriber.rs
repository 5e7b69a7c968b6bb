//! The ingest connection: subscribes to heartbeats and Wills, validates each message
//! and queues what is valid for the heartbeat handler.
//!
//! Overload policy: the queue is bounded and the subscriber waits for room. While it
//! waits it stops reading from the broker, so the pressure travels back over TCP to
//! the broker, which buffers or applies its own limits. The hub never drops a valid
//! heartbeat it has read, and a heartbeat that waited is stamped with its (later)
//! receipt time, which can delay an offline verdict but never cause a false one.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use rumqttc::{AsyncClient, Event, Packet, Publish, QoS, SubscribeFilter, SubscribeReasonCode};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::topic::{self, Kind};
use super::{Backoff, Endpoint};
use crate::clock::{Clock, Timestamp};
use crate::device::DeviceId;
use crate::heartbeat::{Inbound, RejectLog, RejectReason, payload};
use crate::metrics::Metrics;

pub struct Subscriber {
    endpoint: Endpoint,
    clock: Clock,
    queue: mpsc::Sender<Inbound>,
    listening: watch::Sender<Option<Timestamp>>,
    metrics: Arc<Metrics>,
    rejects: RejectLog,
}

impl Subscriber {
    pub fn new(
        endpoint: Endpoint,
        clock: Clock,
        queue: mpsc::Sender<Inbound>,
        listening: watch::Sender<Option<Timestamp>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let rejects = RejectLog::new(Arc::clone(&metrics));
        Self {
            endpoint,
            clock,
            queue,
            listening,
            metrics,
            rejects,
        }
    }

    /// Runs until `shutdown`; dropping the queue sender on return tells the handler
    /// that no more messages will come.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let (client, mut eventloop) = AsyncClient::new(self.endpoint.options("ingest"), 16);
        let mut backoff = Backoff::new();
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => break,
                event = eventloop.poll() => event,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff.reset();
                    // Clean session: the subscription is gone after every reconnect.
                    let filters = [topic::HEARTBEAT_FILTER, topic::LWT_FILTER]
                        .map(|filter| SubscribeFilter::new(filter.to_string(), QoS::AtLeastOnce));
                    if let Err(e) = client.try_subscribe_many(filters) {
                        tracing::error!(error = %e, "could not request the heartbeat subscription");
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let refused = ack
                        .return_codes
                        .iter()
                        .any(|code| matches!(code, SubscribeReasonCode::Failure));
                    if refused {
                        tracing::error!("the broker refused the heartbeat subscription");
                    } else {
                        self.listening.send_replace(Some(self.clock.now()));
                        tracing::info!(
                            host = %self.endpoint.host,
                            port = self.endpoint.port,
                            "subscribed to device heartbeats"
                        );
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    if !self.receive(publish).await {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let was_listening = self.listening.send_replace(None).is_some();
                    let delay = backoff.next();
                    if was_listening {
                        tracing::warn!(error = %e, "lost the broker connection; offline checks paused until it is back");
                    } else {
                        tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot reach the MQTT broker");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        self.listening.send_replace(None);
        // Best effort: a clean DISCONNECT, so the broker does not wait out a keep-alive.
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(std::time::Duration::from_millis(200), eventloop.poll()).await;
    }

    /// Validates one message and queues it. False when the handler is gone.
    async fn receive(&mut self, publish: Publish) -> bool {
        let at = self.clock.now();
        let Some(message) = self.validate(&publish, at) else {
            return true;
        };
        match &message {
            Inbound::Heartbeat { .. } => self.metrics.heartbeats_received.fetch_add(1, Relaxed),
            _ => self.metrics.wills_received.fetch_add(1, Relaxed),
        };
        self.queue.send(message).await.is_ok()
    }

    fn validate(&mut self, publish: &Publish, at: Timestamp) -> Option<Inbound> {
        let topic = publish.topic.as_str();
        let Some((raw_id, kind)) = topic::parse(topic) else {
            self.rejects
                .reject(RejectReason::UnknownTopic, topic, &"not a device topic");
            return None;
        };
        if publish.retain {
            // Replayed by the broker because we subscribed, not sent just now.
            self.rejects.reject(
                RejectReason::Retained,
                topic,
                &"retained message is not a live heartbeat",
            );
            return None;
        }
        let device = match DeviceId::parse(raw_id) {
            Ok(device) => device,
            Err(e) => {
                self.rejects
                    .reject(RejectReason::InvalidDeviceId, topic, &e);
                return None;
            }
        };
        match kind {
            Kind::Lwt => Some(Inbound::ConnectionLost { device, at }),
            Kind::Heartbeat => match payload::parse(&publish.payload, self.endpoint.max_payload) {
                Ok(heartbeat) => Some(Inbound::Heartbeat {
                    device,
                    at,
                    heartbeat: Box::new(heartbeat),
                }),
                Err(e) => {
                    self.rejects.reject(e.reason(), topic, &e);
                    None
                }
            },
        }
    }
}
