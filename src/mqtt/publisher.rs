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
//! are checked against that order; a mismatch drops the connection and sends again.
//!
//! On every connection the current status of every device is published again first
//! (same events, same ids): the embedded broker loses retained messages with the
//! process, and an external one can lose the last ones it had not saved when it
//! crashed. A device whose latest event is still in the outbox is left to the outbox,
//! and both go through one queue, so a device's retained status always ends at its
//! latest event.

use std::collections::VecDeque;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, Outgoing, Packet, QoS};
use tokio::sync::Notify;
use tokio::time::{self, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::{Backoff, Endpoint, FailureLog, topic};
use crate::clock::Clock;
use crate::device::DeviceId;
use crate::event::StatusEvent;
use crate::health::{Health, Outage};
use crate::metrics::Metrics;
use crate::storage::{OutboxEntry, OutboxItem, Store, StoreError};

/// Events in flight at once (rumqttc's inflight limit and request channel size).
const WINDOW: u16 = 256;
/// Events loaded from the database per read; the queue is refilled below this.
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
    fn status(event: &StatusEvent, seq: Option<i64>) -> Self {
        Self {
            seq,
            topic: topic::status(event.device_id.as_str()),
            payload: event.to_json(),
        }
    }

    fn outbox(item: &OutboxItem) -> Self {
        match &item.entry {
            OutboxEntry::Status(event) => Self::status(event, Some(item.seq)),
            // An empty retained message deletes the retained status.
            OutboxEntry::Clear(device) => Self {
                seq: Some(item.seq),
                topic: topic::status(device.as_str()),
                payload: Vec::new(),
            },
        }
    }
}

pub struct Publisher {
    endpoint: Endpoint,
    store: Arc<dyn Store>,
    outbox_changed: Arc<Notify>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    clock: Clock,
    /// Reading the outbox, and marking acknowledged events, while they fail.
    read_outage: Outage,
    mark_outage: Outage,
    /// A republish of current statuses in progress: the last device id loaded.
    republish: Option<Option<DeviceId>>,
    /// The outbox may hold events past `cursor`.
    outbox_dirty: bool,
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
    draining: bool,
}

impl Publisher {
    pub fn new(
        endpoint: Endpoint,
        store: Arc<dyn Store>,
        outbox_changed: Arc<Notify>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        clock: Clock,
    ) -> Self {
        Self {
            endpoint,
            store,
            outbox_changed,
            metrics,
            health,
            clock,
            read_outage: Outage::default(),
            mark_outage: Outage::default(),
            republish: None,
            outbox_dirty: true,
            cursor: 0,
            queue: VecDeque::new(),
            inflight: VecDeque::new(),
            packet_ids: VecDeque::new(),
            acked: Vec::new(),
            connected: false,
            draining: false,
        }
    }

    /// Publishes until `stop`, then delivers what is left for up to [`DRAIN_TIMEOUT`].
    /// Cancel `stop` only after every producer of events has stopped.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut options = self.endpoint.options("events", super::EVENTS_KEEP_ALIVE);
        options.set_inflight(WINDOW);
        let (client, mut eventloop) = AsyncClient::new(options, usize::from(WINDOW));
        let mut tick = time::interval(MARK_EVERY);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_poll = Instant::now();
        let mut drain_deadline = far_future();
        let mut backoff = Backoff::new();
        let mut failures = FailureLog::default();
        loop {
            // The poll future lives across wake-ups: it is never dropped half-way
            // through writing a packet.
            let polled = {
                let mut poll = pin!(eventloop.poll());
                loop {
                    self.refill().await;
                    self.send_ready(&client);
                    self.health
                        .events(self.queue.len() + self.inflight.len(), false);
                    if self.draining && self.is_done() {
                        self.mark_acked().await;
                        let _ = client.try_disconnect();
                        let _ = time::timeout(Duration::from_millis(200), &mut poll).await;
                        return;
                    }
                    tokio::select! {
                        polled = &mut poll => break polled,
                        _ = self.outbox_changed.notified() => self.outbox_dirty = true,
                        _ = tick.tick() => {
                            self.mark_acked().await;
                            if last_poll.elapsed() >= OUTBOX_POLL {
                                self.outbox_dirty = true;
                                last_poll = Instant::now();
                            }
                        }
                        _ = stop.cancelled(), if !self.draining => {
                            self.start_draining();
                            drain_deadline = Instant::now() + DRAIN_TIMEOUT;
                        }
                        _ = time::sleep_until(drain_deadline), if self.draining => {
                            self.give_up().await;
                            return;
                        }
                    }
                }
            };
            match polled {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff.reset();
                    failures.connected();
                    self.connected().await;
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => self.packet_ids.push_back(pkid),
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if !self.on_ack(ack.pkid) {
                        // Our view of the stream is wrong: start the connection over.
                        self.disconnected();
                        let _ = client.try_disconnect();
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    // Anything buffered belongs to the dead connection.
                    eventloop.state.events.clear();
                    self.disconnected();
                    let delay = backoff.next();
                    if !failures.failed("events", &e, delay) {
                        tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, pending = self.queue.len(), "status publisher cannot reach the broker");
                    }
                    tokio::select! {
                        _ = time::sleep(delay) => {}
                        _ = stop.cancelled(), if !self.draining => {
                            self.start_draining();
                            drain_deadline = Instant::now() + DRAIN_TIMEOUT;
                        }
                        _ = time::sleep_until(drain_deadline), if self.draining => {
                            self.give_up().await;
                            return;
                        }
                    }
                }
            }
        }
    }

    async fn connected(&mut self) {
        self.connected = true;
        // Acknowledged events must be marked before the republish reads what is
        // published, or a device acknowledged but unmarked would be skipped.
        self.mark_acked().await;
        if !self.draining {
            self.republish = Some(None);
        }
        tracing::info!(
            host = %self.endpoint.host,
            port = self.endpoint.port,
            pending = self.queue.len(),
            "status publisher connected"
        );
    }

    fn start_draining(&mut self) {
        self.draining = true;
        // The next start republishes; what matters now is the outbox.
        self.republish = None;
        self.outbox_dirty = true;
    }

    /// Nothing left to send, in memory or in the outbox.
    fn is_done(&self) -> bool {
        self.queue.is_empty() && self.inflight.is_empty() && !self.outbox_dirty
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

    /// Credits the oldest event in flight. False if the acknowledgement is not the
    /// one expected next.
    fn on_ack(&mut self, pkid: u16) -> bool {
        if !self.connected {
            return true;
        }
        let expected = self.packet_ids.pop_front();
        if expected != Some(pkid) {
            tracing::error!(pkid, expected = ?expected, "broker acknowledged events out of order; sending them again");
            return false;
        }
        if let Some(done) = self.inflight.pop_front() {
            self.metrics.events_published.fetch_add(1, Relaxed);
            self.health
                .events(self.queue.len() + self.inflight.len(), true);
            if let Some(seq) = done.seq {
                self.acked.push(seq);
            }
        }
        true
    }

    /// Every unacknowledged send is lost with the connection: queue it again, in order.
    fn disconnected(&mut self) {
        self.connected = false;
        self.packet_ids.clear();
        while let Some(lost) = self.inflight.pop_back() {
            self.queue.push_front(lost);
        }
    }

    /// Loads more to send while the queue is below a page: current statuses first if
    /// a republish is in progress, then the outbox.
    async fn refill(&mut self) {
        while self.queue.len() < PAGE as usize && (self.republish.is_some() || self.outbox_dirty) {
            let loaded = match self.republish.clone() {
                Some(after) => self.load_current(after).await,
                None => self.load_outbox().await,
            };
            match loaded {
                Ok(()) => {
                    if let Some(lasted) = self.read_outage.ended() {
                        tracing::info!(
                            after_s = lasted.as_secs_f64(),
                            "the event outbox is readable again"
                        );
                    }
                }
                Err(e) => {
                    if self.read_outage.failed() {
                        tracing::warn!(error = %e, "could not read the event outbox; retrying");
                    }
                    return;
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
        self.queue.extend(
            page.iter()
                .map(|stored| Pending::status(&stored.event, None)),
        );
        Ok(())
    }

    async fn load_outbox(&mut self) -> Result<(), StoreError> {
        let page = self.store.unpublished(self.cursor, PAGE).await?;
        if let Some(last) = page.last() {
            self.cursor = last.seq;
        }
        self.outbox_dirty = page.len() == PAGE as usize;
        self.queue.extend(page.iter().map(Pending::outbox));
        Ok(())
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
            Ok(()) => {
                self.acked.clear();
                if let Some(lasted) = self.mark_outage.ended() {
                    tracing::info!(
                        after_s = lasted.as_secs_f64(),
                        "acknowledged events are marked published again"
                    );
                }
            }
            Err(e) => {
                if self.mark_outage.failed() {
                    tracing::warn!(error = %e, events = self.acked.len(), "could not mark events published; retrying");
                }
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
