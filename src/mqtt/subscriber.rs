//! The ingest connection: subscribes to heartbeats and Wills, validates each message
//! and queues what is valid for the heartbeat handler.
//!
//! Overload policy: the queue is bounded and the subscriber waits for room. While it
//! waits it stops reading from the broker, so the pressure travels back over TCP to
//! the broker, which buffers or applies its own limits. The hub never drops a valid
//! heartbeat it has read. But heartbeats held back meanwhile are stamped late, so a
//! wait longer than [`STALL`] counts as deafness, like a lost connection: the offline
//! checker's grace starts again when reading resumes.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use std::time::Duration;

use rumqttc::{AsyncClient, Event, Packet, Publish, QoS, SubscribeFilter, SubscribeReasonCode};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::topic::{self, Kind};
use super::{Backoff, Endpoint, FailureLog, INGEST_KEEP_ALIVE};
use crate::clock::{Clock, Timestamp};
use crate::device::DeviceId;
use crate::heartbeat::{Inbound, RejectLog, RejectReason, payload};
use crate::metrics::Metrics;

/// A wait for queue room longer than this makes the hub count as having not heard.
pub const STALL: Duration = Duration::from_secs(1);
/// At shutdown, how long messages already read wait for room in the queue.
const DRAIN_WAIT: Duration = Duration::from_secs(2);
/// Before asking again for a subscription the broker refused.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(10);

/// The heartbeat and Will subscriptions; through a shared subscription group when
/// several hubs share the work (the broker hands each message to one of them, and the
/// message keeps its own topic).
fn filters(shared_group: Option<&str>) -> [SubscribeFilter; 2] {
    [topic::HEARTBEAT_FILTER, topic::LWT_FILTER].map(|filter| {
        let filter = match shared_group {
            Some(group) => format!("$share/{group}/{filter}"),
            None => filter.to_string(),
        };
        SubscribeFilter::new(filter, QoS::AtLeastOnce)
    })
}

/// What became of a message on its way to the handler.
enum Handed {
    Queued,
    /// The handler is gone.
    Closed,
    /// Gave up waiting for room; the message is still ours.
    Waiting(Inbound),
}

pub struct Subscriber {
    endpoint: Endpoint,
    clock: Clock,
    queue: mpsc::Sender<Inbound>,
    listening: watch::Sender<Option<Timestamp>>,
    metrics: Arc<Metrics>,
    rejects: RejectLog,
    /// When a stall was last logged.
    stall_logged: Option<Instant>,
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
            stall_logged: None,
        }
    }

    /// Runs until `shutdown`; dropping the queue sender on return tells the handler
    /// that no more messages will come.
    pub async fn run(mut self, shutdown: CancellationToken) {
        // A message read but not yet queued when the shutdown came.
        let mut held = None;
        let options = self.endpoint.options("ingest", INGEST_KEEP_ALIVE);
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        let mut backoff = Backoff::new();
        let mut failures = FailureLog::default();
        let mut resubscribe_at: Option<Instant> = None;
        loop {
            let retry =
                resubscribe_at.unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400));
            let event = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(retry), if resubscribe_at.is_some() => {
                    resubscribe_at = None;
                    if let Err(e) = client.try_subscribe_many(filters(self.endpoint.shared_group.as_deref())) {
                        tracing::error!(error = %e, "could not request the heartbeat subscription");
                    }
                    continue;
                }
                event = eventloop.poll() => event,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff.reset();
                    failures.connected();
                    // Clean session: the subscription is gone after every reconnect.
                    if let Err(e) =
                        client.try_subscribe_many(filters(self.endpoint.shared_group.as_deref()))
                    {
                        tracing::error!(error = %e, "could not request the heartbeat subscription");
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let refused = ack
                        .return_codes
                        .iter()
                        .any(|code| matches!(code, SubscribeReasonCode::Failure));
                    if refused {
                        tracing::error!(
                            retry_in_s = RESUBSCRIBE_AFTER.as_secs(),
                            "the broker refused the subscription to devices/+/heartbeat or devices/+/lwt \
                             (check its ACL); offline checks stay paused"
                        );
                        resubscribe_at = Some(Instant::now() + RESUBSCRIBE_AFTER);
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
                    match self.receive(publish, shutdown.cancelled()).await {
                        Handed::Queued => {}
                        Handed::Closed => break,
                        // Stopping with the queue full: this one is read and
                        // acknowledged, so it gets the drain's wait below.
                        Handed::Waiting(message) => {
                            held = Some(message);
                            break;
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let was_listening = self.listening.send_replace(None).is_some();
                    let delay = backoff.next();
                    // A refused login is logged once, not at every retry.
                    let refused = failures.failed("ingest", &e, delay);
                    if was_listening && !refused {
                        tracing::warn!(error = %e, "lost the broker connection; offline checks paused until it is back");
                    } else if !refused {
                        tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot reach the MQTT broker");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        // Messages rumqttc has read (and acknowledged) but not yet handed out are
        // queued too, or a Will could be lost at every shutdown. A handler that takes
        // nothing (its database failing) is waited for only so long.
        let deadline = Instant::now() + DRAIN_WAIT;
        let buffered = std::mem::take(&mut eventloop.state.events);
        let mut left = buffered
            .iter()
            .filter(|e| matches!(e, Event::Incoming(Packet::Publish(_))))
            .count();
        let mut handed = Handed::Queued;
        if let Some(message) = held {
            left += 1;
            handed = self
                .enqueue(message, tokio::time::sleep_until(deadline))
                .await;
            if matches!(handed, Handed::Queued) {
                left -= 1;
            }
        }
        for event in buffered {
            if !matches!(handed, Handed::Queued) {
                break;
            }
            if let Event::Incoming(Packet::Publish(publish)) = event {
                handed = self
                    .receive(publish, tokio::time::sleep_until(deadline))
                    .await;
                if matches!(handed, Handed::Queued) {
                    left -= 1;
                }
            }
        }
        if left > 0 {
            tracing::warn!(
                messages = left,
                "stopped with received messages the heartbeat handler did not take"
            );
        }
        self.listening.send_replace(None);
        // Best effort: a clean DISCONNECT, so the broker does not wait out a keep-alive.
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
    }

    /// Validates one message and queues it.
    async fn receive(&mut self, publish: Publish, give_up: impl Future<Output = ()>) -> Handed {
        let at = self.clock.now();
        let Some(message) = self.validate(&publish, at) else {
            return Handed::Queued;
        };
        match &message {
            Inbound::Heartbeat { .. } => self.metrics.heartbeats_received.fetch_add(1, Relaxed),
            _ => self.metrics.wills_received.fetch_add(1, Relaxed),
        };
        self.enqueue(message, give_up).await
    }

    /// Hands a valid message to the handler, waiting for room until `give_up`.
    async fn enqueue(&mut self, message: Inbound, give_up: impl Future<Output = ()>) -> Handed {
        // The queue usually has room: only a full one is waited on, and timed.
        let message = match self.queue.try_send(message) {
            Ok(()) => return Handed::Queued,
            Err(mpsc::error::TrySendError::Closed(_)) => return Handed::Closed,
            Err(mpsc::error::TrySendError::Full(message)) => message,
        };
        let waited = Instant::now();
        // `reserve`, not `send`: giving up must leave the message in our hands.
        tokio::select! {
            slot = self.queue.reserve() => match slot {
                Ok(slot) => slot.send(message),
                Err(_) => return Handed::Closed,
            },
            () = give_up => return Handed::Waiting(message),
        }
        if waited.elapsed() > STALL {
            self.stalled(waited.elapsed());
        }
        Handed::Queued
    }

    /// The handler fell behind long enough that heartbeats waited unread: restart the
    /// grace, as after a reconnect.
    fn stalled(&mut self, waited: Duration) {
        let now = self.clock.now();
        let restarted = self.listening.send_if_modified(|since| match since {
            Some(since) => {
                *since = now;
                true
            }
            None => false,
        });
        let quiet = self
            .stall_logged
            .is_some_and(|at| at.elapsed() < Duration::from_secs(10));
        if restarted && !quiet {
            self.stall_logged = Some(Instant::now());
            tracing::warn!(
                waited_ms = waited.as_millis() as u64,
                "heartbeat intake stalled (the database is slower than the fleet); offline checks restart their grace"
            );
        }
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
            Kind::Heartbeat => {
                match payload::parse_from(&device, &publish.payload, self.endpoint.max_payload) {
                    Ok(heartbeat) => Some(Inbound::Heartbeat {
                        device,
                        at,
                        heartbeat: Box::new(heartbeat),
                        receipt: None,
                    }),
                    Err(e) => {
                        self.rejects.reject(e.reason(), topic, &e);
                        None
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_group_wraps_both_subscriptions() {
        let paths = |group| filters(group).map(|f| f.path);
        assert_eq!(
            paths(None),
            ["devices/+/heartbeat".to_string(), "devices/+/lwt".into()]
        );
        assert_eq!(
            paths(Some("hubs")),
            [
                "$share/hubs/devices/+/heartbeat".to_string(),
                "$share/hubs/devices/+/lwt".into()
            ]
        );
    }
}
