//! The events connection: publishes the outbox to `devices/{id}/status`, retained,
//! QoS 1, in commit order, and marks each event published once the broker has
//! acknowledged it.
//!
//! Delivery is at least once with stable ids: an event is marked only after its
//! PUBACK, so one acknowledged just before a crash is sent again after restart with
//! the same `event_id`, and one never acknowledged is never marked.
//!
//! Matching PUBACKs to events relies on MQTT 3.1.1 section 4.6: a broker acknowledges
//! QoS 1 publishes in the order it received them. This task alone owns the client,
//! sends only while connected, and treats every unacknowledged event as unsent when
//! the connection drops (rumqttc discards them with a clean session), so the n-th
//! PUBACK of a connection is the n-th event sent on it. The packet ids rumqttc reports
//! are checked against that order.

use std::collections::VecDeque;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, Outgoing, Packet, QoS};
use tokio::sync::Notify;
use tokio::time::{self, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::{Backoff, Endpoint, topic};
use crate::clock::Clock;
use crate::device::DeviceId;
use crate::event::StoredEvent;
use crate::metrics::Metrics;
use crate::storage::{Store, StoreError};

/// Events in flight at once (rumqttc's inflight limit and request channel size).
const WINDOW: u16 = 256;
/// Events loaded from the database per read.
const PAGE: u32 = 1024;
/// How often the outbox is read even without a wake-up, for events written by another
/// process (`fleetwatch check`).
const OUTBOX_POLL: Duration = Duration::from_secs(1);
/// Acknowledged events are marked in the database at least this often.
const MARK_EVERY: Duration = Duration::from_millis(200);
/// At shutdown, how long to keep trying to deliver what is left.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// One message to send.
#[derive(Clone, Debug)]
struct Pending {
    /// Outbox position, or `None` for a republish of an event already marked.
    seq: Option<i64>,
    topic: String,
    payload: Vec<u8>,
}

impl Pending {
    fn new(stored: &StoredEvent, seq: Option<i64>) -> Self {
        Self {
            seq,
            topic: topic::status(stored.event.device_id.as_str()),
            payload: stored.event.to_json(),
        }
    }
}

pub struct Publisher {
    endpoint: Endpoint,
    store: Arc<dyn Store>,
    outbox_changed: Arc<Notify>,
    metrics: Arc<Metrics>,
    clock: Clock,
    /// Republish every device's current status first: set when the broker keeps no
    /// retained messages across restarts (the embedded one).
    republish: Option<Option<DeviceId>>,
    /// Highest outbox position loaded into `queue`.
    cursor: i64,
    queue: VecDeque<Pending>,
    /// Sent on the current connection and not yet acknowledged, in send order.
    inflight: VecDeque<Pending>,
    /// Packet ids rumqttc gave the sends of this connection, in order.
    packet_ids: VecDeque<u16>,
    /// Acknowledged outbox positions not yet marked in the database.
    acked: Vec<i64>,
    connected: bool,
}

impl Publisher {
    pub fn new(
        endpoint: Endpoint,
        store: Arc<dyn Store>,
        outbox_changed: Arc<Notify>,
        metrics: Arc<Metrics>,
        clock: Clock,
        republish_current: bool,
    ) -> Self {
        Self {
            endpoint,
            store,
            outbox_changed,
            metrics,
            clock,
            republish: republish_current.then_some(None),
            cursor: 0,
            queue: VecDeque::new(),
            inflight: VecDeque::new(),
            packet_ids: VecDeque::new(),
            acked: Vec::new(),
            connected: false,
        }
    }

    /// Publishes until `stop`, then delivers what is left for up to [`DRAIN_TIMEOUT`].
    /// Cancel `stop` only after every producer of events has stopped.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut options = self.endpoint.options("events");
        options.set_inflight(WINDOW);
        let (client, mut eventloop) = AsyncClient::new(options, usize::from(WINDOW));
        let mut tick = time::interval(MARK_EVERY);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_read = Instant::now();
        let mut drain_deadline: Option<Instant> = None;
        let mut backoff = Backoff::new();
        self.refill().await;
        loop {
            // The poll future lives across wake-ups: it is never dropped half-way
            // through writing a packet.
            let polled = {
                let mut poll = pin!(eventloop.poll());
                loop {
                    self.send_ready(&client);
                    if drain_deadline.is_some() && self.is_idle() {
                        self.mark_acked().await;
                        let _ = client.try_disconnect();
                        let _ = time::timeout(Duration::from_millis(200), &mut poll).await;
                        return;
                    }
                    let deadline = drain_deadline.unwrap_or_else(far_future);
                    tokio::select! {
                        polled = &mut poll => break polled,
                        _ = self.outbox_changed.notified() => {
                            self.refill().await;
                            last_read = Instant::now();
                        }
                        _ = tick.tick() => {
                            self.mark_acked().await;
                            if last_read.elapsed() >= OUTBOX_POLL {
                                self.refill().await;
                                last_read = Instant::now();
                            }
                        }
                        _ = stop.cancelled(), if drain_deadline.is_none() => {
                            drain_deadline = Some(Instant::now() + DRAIN_TIMEOUT);
                            self.refill().await;
                        }
                        _ = time::sleep_until(deadline), if drain_deadline.is_some() => {
                            self.give_up().await;
                            return;
                        }
                    }
                }
            };
            match polled {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff.reset();
                    self.connected = true;
                    tracing::info!(
                        host = %self.endpoint.host,
                        port = self.endpoint.port,
                        pending = self.queue.len(),
                        "status publisher connected"
                    );
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => self.packet_ids.push_back(pkid),
                Ok(Event::Incoming(Packet::PubAck(ack))) => self.on_ack(ack.pkid),
                Ok(_) => {}
                Err(e) => {
                    // Anything buffered belongs to the dead connection.
                    eventloop.state.events.clear();
                    self.disconnected();
                    let delay = backoff.next();
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, pending = self.queue.len(), "status publisher cannot reach the broker");
                    let deadline = drain_deadline.unwrap_or_else(far_future);
                    tokio::select! {
                        _ = time::sleep(delay) => {}
                        _ = stop.cancelled(), if drain_deadline.is_none() => {
                            drain_deadline = Some(Instant::now() + DRAIN_TIMEOUT);
                        }
                        _ = time::sleep_until(deadline), if drain_deadline.is_some() => {
                            self.give_up().await;
                            return;
                        }
                    }
                }
            }
        }
    }

    fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.inflight.is_empty()
    }

    /// Hands queued messages to rumqttc while connected and the window has room.
    fn send_ready(&mut self, client: &AsyncClient) {
        while self.connected && self.inflight.len() < usize::from(WINDOW) {
            let Some(next) = self.queue.pop_front() else {
                break;
            };
            match client.try_publish(
                next.topic.clone(),
                QoS::AtLeastOnce,
                true,
                next.payload.clone(),
            ) {
                Ok(()) => self.inflight.push_back(next),
                Err(_) => {
                    // Channel full or closed: try again on the next wake-up.
                    self.queue.push_front(next);
                    break;
                }
            }
        }
    }

    fn on_ack(&mut self, pkid: u16) {
        let expected = self.packet_ids.pop_front();
        if expected != Some(pkid) {
            tracing::error!(pkid, expected = ?expected, "broker acknowledged events out of order");
        }
        if let Some(done) = self.inflight.pop_front() {
            self.metrics.events_published.fetch_add(1, Relaxed);
            if let Some(seq) = done.seq {
                self.acked.push(seq);
            }
        }
    }

    /// Every unacknowledged send is lost with the connection: queue it again, in order.
    fn disconnected(&mut self) {
        self.connected = false;
        self.packet_ids.clear();
        while let Some(lost) = self.inflight.pop_back() {
            self.queue.push_front(lost);
        }
    }

    /// Loads more to send when the queue runs low: the current statuses first if a
    /// republish is due, then the outbox.
    async fn refill(&mut self) {
        while self.queue.len() < PAGE as usize {
            let more = match self.republish.clone() {
                Some(after) => self.load_current(after).await.map(|()| true),
                None => self.load_outbox().await.map(|loaded| loaded > 0),
            };
            match more {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "could not read the event outbox; retrying");
                    break;
                }
            }
        }
    }

    async fn load_current(&mut self, after: Option<DeviceId>) -> Result<(), StoreError> {
        let page = self.store.current_events(after.as_ref(), PAGE).await?;
        self.republish = match page.last() {
            Some(last) if page.len() == PAGE as usize => Some(Some(last.event.device_id.clone())),
            _ => {
                tracing::info!("republished the current status of every known device");
                None
            }
        };
        self.queue
            .extend(page.iter().map(|stored| Pending::new(stored, None)));
        Ok(())
    }

    async fn load_outbox(&mut self) -> Result<usize, StoreError> {
        let page = self.store.unpublished_events(self.cursor, PAGE).await?;
        if let Some(last) = page.last() {
            self.cursor = last.seq;
        }
        self.queue.extend(
            page.iter()
                .map(|stored| Pending::new(stored, Some(stored.seq))),
        );
        Ok(page.len())
    }

    async fn mark_acked(&mut self) {
        if self.acked.is_empty() {
            return;
        }
        match self
            .store
            .mark_published(&self.acked, self.clock.now())
            .await
        {
            Ok(()) => self.acked.clear(),
            Err(e) => {
                tracing::warn!(error = %e, events = self.acked.len(), "could not mark events published; retrying")
            }
        }
    }

    async fn give_up(&mut self) {
        self.mark_acked().await;
        let left = self.queue.len() + self.inflight.len();
        tracing::warn!(
            events = left,
            "shutting down with status events undelivered; they are kept and sent at the next start"
        );
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}
