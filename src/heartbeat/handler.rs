//! The heartbeat handler: the single writer of heartbeat state in a hub.
//!
//! It drains the bounded queue the subscriber fills, coalesces messages per device,
//! and commits a batch every `flush_interval`, when `max_batch` devices are pending,
//! when the offline checker asks, and at shutdown. A transition's event is committed
//! with the batch, before anything is published.
//!
//! A heartbeat whose sender waits for its commit (HTTP) does not wait for the next
//! `flush_interval`: the batch is committed as soon as the queue is momentarily empty,
//! or [`GATHER`] after the first waiter arrived, whichever is first. Waiters that
//! arrive while a commit runs share the next one (group commit), so 64 connections
//! cost a few commits per round, not 64; MQTT heartbeats alone keep the interval.
//!
//! A failed commit loses nothing: the batch is kept, merged with what arrives meanwhile,
//! and retried after a pause that grows to a second. What it holds is bounded by
//! `max_uncommitted` devices; past that the handler stops taking from the queue, so
//! the pressure goes back to the subscriber (which then counts as not listening: no
//! device goes offline for the database's fault) and to HTTP clients (503).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::{self, Instant, MissedTickBehavior};

use super::{Inbound, Outcome, Receipt, RejectLog, RejectReason};
use crate::alerts::AlertChannel;
use crate::device::DeviceId;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::registration::{NewDevices, Policy, RateLimit, Refusal};
use crate::storage::{Applied, Store};
use crate::update::Batch;

/// Messages taken from the queue per wake-up.
const RECV_CHUNK: usize = 1024;
/// Longest a waiting sender's heartbeat is held for others to join its commit while
/// the queue keeps delivering (MQTT traffic, say); with a quiet queue it is committed
/// at once. Measured (`bench/run.sh --only http`, 64 connections, 2 cores): about
/// 27,000 heartbeats/s at p50 2.1 ms, 22 heartbeats a commit; committing at the next
/// `flush_interval` instead gave 255/s at p50 250 ms.
const GATHER: Duration = Duration::from_millis(2);
/// The first pause after a failed commit; it doubles up to [`RETRY_MAX`], so a
/// database that comes back is written again within a second.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// While commits fail, how often the failure is logged again.
const LOG_EVERY: Duration = Duration::from_secs(30);
/// At shutdown, how long to keep retrying a failing commit before giving up.
const FINAL_FLUSH_WINDOW: Duration = Duration::from_secs(5);

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
    health: Arc<Health>,
    batch: Batch,
    /// Heartbeats whose sender waits to hear they were committed.
    receipts: Vec<(DeviceId, Receipt)>,
    limits: Limits,
    /// When the oldest heartbeat in `batch` arrived.
    held_since: Option<Instant>,
    /// When the oldest entry of `receipts` arrived: a waiter is committed within
    /// [`GATHER`] of it, not at the next tick.
    waiting_since: Option<Instant>,
    /// Set while commits fail.
    failing: Option<Failing>,
    registration: Policy,
    /// New devices by heartbeat allowed now.
    new_devices: RateLimit,
    /// Refused registrations, counted and logged (rate-limited).
    rejects: RejectLog,
}

/// How the handler batches and how much it may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub flush_interval: Duration,
    /// Distinct devices pending that trigger a flush before `flush_interval`.
    pub max_batch: usize,
    /// Distinct devices held while commits fail before the handler stops taking more.
    pub max_uncommitted: usize,
    /// The same bound in (approximate) bytes.
    pub max_uncommitted_bytes: usize,
}

/// Commits are failing: when to try again and what to tell.
#[derive(Debug)]
struct Failing {
    since: Instant,
    attempts: u32,
    retry_at: Instant,
    delay: Duration,
    logged_at: Instant,
    error: String,
}

/// A deadline that never comes, for a disabled `select!` branch's timer.
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

/// What the handler could not commit before it stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("could not commit the heartbeats of {devices} devices before stopping ({error})")]
pub struct Unsaved {
    pub devices: usize,
    pub error: String,
}

impl HeartbeatHandler {
    pub fn new(
        store: Arc<dyn Store>,
        alerts: AlertChannel,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        limits: Limits,
        registration: Policy,
    ) -> Self {
        Self {
            rejects: RejectLog::new(Arc::clone(&metrics)),
            new_devices: RateLimit::new(registration.rate, registration.burst),
            registration,
            store,
            alerts,
            metrics,
            health,
            batch: Batch::default(),
            receipts: Vec::new(),
            limits: Limits {
                max_batch: limits.max_batch.max(1),
                max_uncommitted: limits.max_uncommitted.max(1),
                ..limits
            },
            held_since: None,
            waiting_since: None,
            failing: None,
        }
    }

    /// Runs until every sender of `queue` is gone, then commits what is left. `Err`
    /// says what could not be committed by then.
    pub async fn run(mut self, mut queue: mpsc::Receiver<Inbound>) -> Result<(), Unsaved> {
        // The first tick one interval from now, not at once: a tick racing the first
        // messages would flush them outside the shutdown's bounded window.
        let mut ticker = time::interval_at(
            Instant::now() + self.limits.flush_interval,
            self.limits.flush_interval,
        );
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut chunk = Vec::with_capacity(RECV_CHUNK);
        loop {
            // While commits fail, holding as much as allowed (checked per chunk taken,
            // so the bound is the limit plus at most one chunk): take nothing more
            // until a commit succeeds. The queue fills, the subscriber stalls (the
            // checker's grace restarts), and HTTP heartbeats time out with 503.
            let full = self.failing.is_some()
                && (self.batch.len() >= self.limits.max_uncommitted
                    || self.batch.bytes() >= self.limits.max_uncommitted_bytes);
            let gathered = self.gathered_at();
            tokio::select! {
                received = queue.recv_many(&mut chunk, RECV_CHUNK), if !full => {
                    if received == 0 {
                        break;
                    }
                    self.metrics.queue_depth.store(queue.len() as u64, Relaxed);
                    for message in chunk.drain(..) {
                        self.take(message).await;
                    }
                    let waited = self
                        .waiting_since
                        .is_some_and(|since| queue.is_empty() || since.elapsed() >= GATHER);
                    if self.batch.len() >= self.limits.max_batch || waited {
                        // A failure is logged and the batch kept for the next attempt.
                        let _ = self.flush_when_due().await;
                    }
                    self.report();
                }
                () = time::sleep_until(gathered.unwrap_or_else(far_future)), if gathered.is_some() => {
                    let _ = self.flush_when_due().await;
                }
                _ = ticker.tick() => {
                    let _ = self.flush_when_due().await;
                    if full && queue.is_closed() {
                        break;
                    }
                }
            }
        }
        // Stopping: whatever is still queued is taken, however much that is (the
        // queue is bounded), then committed if the database lets us.
        while let Ok(message) = queue.try_recv() {
            self.take(message).await;
        }
        self.final_flush().await
    }

    async fn take(&mut self, message: Inbound) {
        match message {
            Inbound::Heartbeat {
                device,
                at,
                heartbeat,
                receipt,
            } => {
                self.hold();
                if let Some(receipt) = receipt {
                    self.waiting_since.get_or_insert_with(Instant::now);
                    self.receipts.push((device.clone(), receipt));
                }
                self.batch.add_heartbeat(device, at, *heartbeat);
            }
            Inbound::ConnectionLost { device, at } => {
                self.hold();
                self.batch.add_connection_lost(device, at);
            }
            Inbound::Flush { reply } => {
                let result = self.flush_when_due().await;
                // The asker may have given up; nothing to do then.
                let _ = reply.send(result);
            }
        }
    }

    /// Notes when the batch starts holding something.
    fn hold(&mut self) {
        if self.batch.is_empty() {
            self.held_since = Some(Instant::now());
        }
    }

    fn report(&self) {
        self.health.uncommitted(self.batch.len(), self.held_since);
    }

    /// When a waiting sender's batch must be committed even if the queue keeps
    /// delivering: [`GATHER`] after the first waiter, but while commits fail not before
    /// the next retry (the backoff governs; a waiter is answered by that attempt).
    fn gathered_at(&self) -> Option<Instant> {
        let due = self.waiting_since? + GATHER;
        Some(match &self.failing {
            Some(failing) => due.max(failing.retry_at),
            None => due,
        })
    }

    /// Flushes, unless commits are failing and the next retry is not due yet.
    async fn flush_when_due(&mut self) -> Result<(), FlushError> {
        if let Some(failing) = &self.failing
            && Instant::now() < failing.retry_at
        {
            return Err(FlushError::Store(failing.error.clone()));
        }
        self.flush().await
    }

    async fn flush(&mut self) -> Result<(), FlushError> {
        self.flush_until(None).await
    }

    /// Commits the batch; an attempt still running at `deadline` is abandoned (its
    /// transaction rolled back) and the batch kept, as after any failure.
    async fn flush_until(&mut self, deadline: Option<Instant>) -> Result<(), FlushError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let messages = self.batch.messages() as u64;
        let updates = self.batch.take();
        let started = Instant::now();
        let new = NewDevices {
            auto_register: self.registration.auto_register,
            allowed: self.new_devices.available(),
            max_devices: self.registration.max_devices,
        };
        let apply = self.store.apply(&updates, new);
        let result = match deadline {
            None => apply.await.map_err(|e| e.to_string()),
            Some(deadline) => match time::timeout_at(deadline, apply).await {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(_) => Err("no commit before the shutdown deadline".to_string()),
            },
        };
        let outcome = match result {
            Ok(Applied { events, refused }) => {
                self.held_since = None;
                self.recovered();
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
                let registered: HashSet<&DeviceId> = events
                    .iter()
                    .filter(|e| e.previous_status.is_none())
                    .map(|e| &e.device_id)
                    .collect();
                self.new_devices.spend(registered.len() as u64);
                let refused: HashMap<DeviceId, Refusal> = refused.into_iter().collect();
                for (device, refusal) in &refused {
                    self.rejects
                        .reject(RejectReason::from(*refusal), device.as_str(), refusal);
                }
                for (device, receipt) in self.receipts.drain(..) {
                    let outcome = match refused.get(&device) {
                        Some(refusal) => Outcome::Refused(
                            *refusal,
                            (*refusal == Refusal::RateLimited).then(|| self.new_devices.next_in()),
                        ),
                        None => Outcome::Committed {
                            registered: registered.contains(&device),
                        },
                    };
                    let _ = receipt.send(Ok(outcome));
                }
                self.waiting_since = None;
                Ok(())
            }
            Err(error) => {
                self.metrics.flush_errors.fetch_add(1, Relaxed);
                self.batch.restore(updates);
                self.failed(&error);
                // The heartbeats stay held and will be committed, but their senders
                // should not wait for that: they hear now that it has not happened.
                for (_, receipt) in self.receipts.drain(..) {
                    let _ = receipt.send(Err(FlushError::Store(error.clone())));
                }
                self.waiting_since = None;
                Err(FlushError::Store(error))
            }
        };
        self.report();
        outcome
    }

    fn failed(&mut self, error: &str) {
        let now = Instant::now();
        let held = self.batch.len();
        match &mut self.failing {
            None => {
                tracing::error!(
                    error,
                    devices = held,
                    "could not commit heartbeats; holding them and retrying"
                );
                self.failing = Some(Failing {
                    since: now,
                    attempts: 1,
                    retry_at: now + RETRY_FIRST,
                    delay: RETRY_FIRST * 2,
                    logged_at: now,
                    error: error.to_string(),
                });
            }
            Some(failing) => {
                failing.attempts += 1;
                failing.retry_at = now + failing.delay;
                failing.delay = (failing.delay * 2).min(RETRY_MAX);
                failing.error = error.to_string();
                if now.duration_since(failing.logged_at) >= LOG_EVERY {
                    failing.logged_at = now;
                    tracing::error!(
                        error,
                        devices = held,
                        attempts = failing.attempts,
                        failing_for_s = now.duration_since(failing.since).as_secs(),
                        "still cannot commit heartbeats; holding them and retrying"
                    );
                }
            }
        }
    }

    fn recovered(&mut self) {
        if let Some(failing) = self.failing.take() {
            tracing::info!(
                attempts = failing.attempts,
                failed_for_s = failing.since.elapsed().as_secs_f64(),
                "heartbeats are committed again"
            );
        }
    }

    /// Keeps trying to commit what is held for up to [`FINAL_FLUSH_WINDOW`], however
    /// long one attempt would wait (a write lock held elsewhere waits 10 s).
    async fn final_flush(&mut self) -> Result<(), Unsaved> {
        let deadline = Instant::now() + FINAL_FLUSH_WINDOW;
        let mut delay = RETRY_FIRST;
        loop {
            let error = match self.flush_until(Some(deadline)).await {
                Ok(()) => return Ok(()),
                Err(FlushError::Store(error)) => error,
                Err(e) => e.to_string(),
            };
            if Instant::now() + delay > deadline {
                let unsaved = Unsaved {
                    devices: self.batch.len(),
                    error,
                };
                tracing::error!(
                    devices = unsaved.devices,
                    error = %unsaved.error,
                    "gave up committing heartbeats at shutdown; they are lost"
                );
                return Err(unsaved);
            }
            time::sleep(delay).await;
            delay = (delay * 2).min(RETRY_MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Timestamp;
    use crate::health::Thresholds;
    use crate::storage::fake::FakeStore;
    use crate::update::Heartbeat;

    const FLUSH: Duration = Duration::from_millis(250);

    struct Harness {
        store: Arc<FakeStore>,
        queue: mpsc::Sender<Inbound>,
        run: tokio::task::JoinHandle<Result<(), Unsaved>>,
    }

    fn harness(max_uncommitted: usize, capacity: usize) -> Harness {
        harness_flushing_every(FLUSH, max_uncommitted, capacity)
    }

    fn harness_flushing_every(flush: Duration, max_uncommitted: usize, capacity: usize) -> Harness {
        let store = Arc::new(FakeStore::default());
        let metrics = Arc::new(Metrics::default());
        let health = Arc::new(Health::new(
            Thresholds {
                commit_lag: Duration::from_secs(10),
                publish_lag: Duration::from_secs(30),
            },
            tokio::sync::watch::channel(None).1,
            None,
        ));
        let handler = HeartbeatHandler::new(
            store.clone(),
            AlertChannel::new(Arc::clone(&metrics)),
            metrics,
            health,
            Limits {
                flush_interval: flush,
                max_batch: 1000,
                max_uncommitted,
                max_uncommitted_bytes: usize::MAX,
            },
            Policy {
                auto_register: true,
                max_devices: None,
                rate: None,
                burst: 1,
            },
        );
        let (queue, inbox) = mpsc::channel(capacity);
        let run = tokio::spawn(handler.run(inbox));
        Harness { store, queue, run }
    }

    fn beat(device: &str) -> Inbound {
        Inbound::Heartbeat {
            device: DeviceId::parse(device).expect("valid id"),
            at: Timestamp::from_unix_millis(1_000),
            heartbeat: Box::new(Heartbeat::default()),
            receipt: None,
        }
    }

    /// An HTTP heartbeat: its sender waits for the commit.
    fn waiting_beat(device: &str) -> (Inbound, oneshot::Receiver<Result<Outcome, FlushError>>) {
        let (receipt, answer) = oneshot::channel();
        let message = Inbound::Heartbeat {
            device: DeviceId::parse(device).expect("valid id"),
            at: Timestamp::from_unix_millis(1_000),
            heartbeat: Box::default(),
            receipt: Some(receipt),
        };
        (message, answer)
    }

    /// Lets the handler run through `span` of paused time.
    async fn pass(span: Duration) {
        let step = Duration::from_millis(10);
        let mut gone = Duration::ZERO;
        while gone < span {
            time::advance(step).await;
            tokio::task::yield_now().await;
            gone += step;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_commit_keeps_the_heartbeats_and_retries_until_one_succeeds() {
        let h = harness(100, 100);
        h.store.fail(Some("disk full"));
        h.queue.send(beat("a")).await.expect("queued");
        pass(FLUSH * 2).await;
        assert!(h.store.committed_devices().is_empty());
        h.queue.send(beat("b")).await.expect("queued");
        pass(Duration::from_secs(5)).await;
        let attempts = *h.store.attempts.lock().expect("lock");
        assert!(
            (3..=12).contains(&attempts),
            "retries back off to one a second: {attempts} attempts in 5 s"
        );

        h.store.fail(None);
        pass(RETRY_MAX + FLUSH).await;
        let mut committed = h.store.committed_devices();
        committed.sort();
        assert_eq!(committed, ["a", "b"], "both kept, committed once");
        drop(h.queue);
        assert_eq!(h.run.await.expect("join"), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn past_max_uncommitted_devices_the_handler_takes_nothing_more() {
        let h = harness(2, 10);
        h.store.fail(Some("disk full"));
        for device in ["a", "b"] {
            h.queue.send(beat(device)).await.expect("queued");
        }
        pass(FLUSH * 2).await;
        for device in ["c", "d", "e"] {
            h.queue.send(beat(device)).await.expect("queued");
        }
        pass(Duration::from_secs(3)).await;
        assert_eq!(
            10 - h.queue.capacity(),
            3,
            "holding two devices, it takes nothing more"
        );

        h.store.fail(None);
        pass(Duration::from_secs(3)).await;
        let mut committed = h.store.committed_devices();
        committed.sort();
        assert_eq!(committed, ["a", "b", "c", "d", "e"]);
        drop(h.queue);
        assert_eq!(h.run.await.expect("join"), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_http_heartbeat_hears_at_once_that_its_commit_failed() {
        let h = harness(100, 100);
        h.store.fail(Some("disk full"));
        let (receipt, answer) = oneshot::channel();
        h.queue
            .send(Inbound::Heartbeat {
                device: DeviceId::parse("agent").expect("valid id"),
                at: Timestamp::from_unix_millis(1_000),
                heartbeat: Box::default(),
                receipt: Some(receipt),
            })
            .await
            .expect("queued");
        let answer = time::timeout(FLUSH * 2, answer)
            .await
            .expect("answered within a flush")
            .expect("answered");
        assert!(matches!(answer, Err(FlushError::Store(why)) if why.contains("disk full")));
        drop(h.queue);
        let _ = h.run.await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_sender_is_committed_at_once_not_at_the_next_flush() {
        let h = harness_flushing_every(Duration::from_secs(3600), 100, 100);
        let (message, answer) = waiting_beat("agent");
        h.queue.send(message).await.expect("queued");
        let answer = time::timeout(GATHER * 3, answer)
            .await
            .expect("answered within a few ms, not at the hourly flush")
            .expect("answered");
        assert_eq!(answer, Ok(Outcome::Committed { registered: false }));
        assert_eq!(h.store.committed_devices(), ["agent"]);
        drop(h.queue);
        assert_eq!(h.run.await.expect("join"), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_waiting_senders_share_one_commit() {
        let h = harness_flushing_every(Duration::from_secs(3600), 100, 100);
        // Queued before the handler first runs (this task has not yielded yet), as
        // requests that arrive while a commit is running are.
        let mut answers = Vec::new();
        for n in 0..16 {
            let (message, answer) = waiting_beat(&format!("agent-{n}"));
            h.queue.send(message).await.expect("queued");
            answers.push(answer);
        }
        for answer in answers {
            let answer = time::timeout(GATHER * 3, answer)
                .await
                .expect("answered within a few ms")
                .expect("answered");
            assert_eq!(answer, Ok(Outcome::Committed { registered: false }));
        }
        assert_eq!(*h.store.attempts.lock().expect("lock"), 1, "one commit");
        assert_eq!(h.store.committed_devices().len(), 16);
        drop(h.queue);
        assert_eq!(h.run.await.expect("join"), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_nobody_waits_for_keep_the_flush_interval() {
        let h = harness(100, 100);
        for device in ["a", "b", "a"] {
            h.queue.send(beat(device)).await.expect("queued");
        }
        pass(FLUSH / 2).await;
        assert_eq!(*h.store.attempts.lock().expect("lock"), 0, "not yet");
        pass(FLUSH).await;
        assert_eq!(*h.store.attempts.lock().expect("lock"), 1, "one commit");
        drop(h.queue);
        assert_eq!(h.run.await.expect("join"), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_among_a_stream_of_mqtt_heartbeats_is_committed_at_once() {
        let h = harness_flushing_every(Duration::from_secs(3600), 100, 100);
        let (message, answer) = waiting_beat("agent");
        h.queue.send(message).await.expect("queued");
        let feeder = {
            let queue = h.queue.clone();
            tokio::spawn(async move {
                for n in 0.. {
                    if queue
                        .send(beat(&format!("sensor-{}", n % 50)))
                        .await
                        .is_err()
                    {
                        break;
                    }
                    time::sleep(Duration::from_millis(1)).await;
                }
            })
        };
        let answer = time::timeout(GATHER * 3, answer)
            .await
            .expect("answered within a few ms")
            .expect("answered");
        assert_eq!(answer, Ok(Outcome::Committed { registered: false }));
        feeder.abort();
        drop(h.queue);
        let _ = h.run.await;
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_senders_do_not_hurry_the_retries_of_a_failing_database() {
        let h = harness_flushing_every(Duration::from_secs(3600), 100, 100);
        h.store.fail(Some("disk full"));
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            let (message, answer) = waiting_beat("agent");
            h.queue.send(message).await.expect("queued");
            let answer = time::timeout(RETRY_MAX * 2, answer)
                .await
                .expect("answered by the next attempt")
                .expect("answered");
            assert!(matches!(answer, Err(FlushError::Store(_))), "{answer:?}");
        }
        let attempts = *h.store.attempts.lock().expect("lock");
        assert!(
            (3..=12).contains(&attempts),
            "retries back off to one a second: {attempts} attempts in 5 s"
        );
        h.store.fail(None);
        let (message, answer) = waiting_beat("agent");
        h.queue.send(message).await.expect("queued");
        let answer = time::timeout(RETRY_MAX * 2, answer)
            .await
            .expect("answered")
            .expect("answered");
        assert_eq!(answer, Ok(Outcome::Committed { registered: false }));
        drop(h.queue);
        assert_eq!(h.run.await.expect("join"), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_shutdown_that_cannot_commit_says_how_many_devices_it_lost() {
        let h = harness(100, 100);
        h.store.fail(Some("disk full"));
        for device in ["a", "b", "a"] {
            h.queue.send(beat(device)).await.expect("queued");
        }
        drop(h.queue);
        let result = time::timeout(FINAL_FLUSH_WINDOW * 2, h.run)
            .await
            .expect("gives up in time")
            .expect("join");
        assert_eq!(
            result,
            Err(Unsaved {
                devices: 2,
                error: "stored data is corrupt: disk full".into()
            })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_commit_that_hangs_at_shutdown_is_given_up_within_the_window() {
        // No flush before the shutdown's own: the hanging commit is the final one.
        let h = harness_flushing_every(Duration::from_secs(3600), 100, 100);
        h.store.hanging.store(true, Relaxed);
        for device in ["a", "b"] {
            h.queue.send(beat(device)).await.expect("queued");
        }
        drop(h.queue);
        let started = Instant::now();
        let result = time::timeout(FINAL_FLUSH_WINDOW * 3, h.run)
            .await
            .expect("does not wait for the hanging commit")
            .expect("join");
        assert!(started.elapsed() <= FINAL_FLUSH_WINDOW + FLUSH * 2);
        assert!(
            matches!(result, Err(Unsaved { devices: 2, .. })),
            "{result:?}"
        );
    }
}
