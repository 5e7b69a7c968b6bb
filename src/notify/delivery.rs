//! One task per sink, so a sink that is down never holds up another.
//!
//! A sink's task takes the transitions committed since its cursor from the event log,
//! queues those its filter matches and moves its cursor past them in one transaction
//! (so each is queued exactly once, whatever crashes), then sends what is due: each
//! device's oldest pending notification only, so a device's notifications arrive in
//! commit order, several devices at once. An answer is recorded after it arrives; a
//! crash in between sends the notification again, under the same idempotency key.
//!
//! Failures: 408, 429, 5xx and no answer are tried again after a pause that doubles
//! from a second up to `notify.retry_max`, with jitter (or what the receiver asked
//! for); the first success after failures makes everything waiting due at once; other
//! 4xx, and anything older than `notify.max_age`, go to the dead letters, and that
//! device's next notification moves up.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::{self, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::SinkSpec;
use super::filter::is_recovery;
use super::message::{Message, Notice};
use super::policy::{Decided, Engine, Facts, Known, PolicySettings};
use super::target::Outcome;
use crate::clock::{Clock, Timestamp};
use crate::device::DeviceId;
use crate::event::StoredEvent;
use crate::health::Outage;
use crate::storage::StoreError;
use crate::storage::notifications::{NewNotification, NotificationStore, Payload, Queued, Settled};

/// The first pause after a failed attempt; it doubles up to `notify.retry_max`.
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// Requests in flight per sink (each to a different device).
const IN_FLIGHT: usize = 16;
/// Transitions read from the log per step.
const PAGE: u32 = 500;
/// Due notifications loaded per read of the store.
const DUE_PAGE: u32 = 512;
/// Answers written per transaction, at most.
const RECORD_BATCH: usize = 256;
/// How often a sink looks without being woken: for retries coming due, and for
/// transitions written by another process (`fleetwatch check`).
const POLL: Duration = Duration::from_millis(500);
/// At shutdown, how long requests in flight may finish (then they are sent again at
/// the next start, under the same key).
const STOP_WAIT: Duration = Duration::from_secs(2);

/// How deliveries are paced (`[notify]`).
#[derive(Debug, Clone, Copy)]
pub struct Pacing {
    pub retry_max: Duration,
    pub timeout: Duration,
    pub max_age: Duration,
}

/// The running sinks.
pub struct Sinks {
    sinks: Vec<Arc<Sink>>,
    /// The event log and the sinks' queues: a notice is made from the event alone.
    store: Arc<dyn NotificationStore>,
    /// What the alert policy reads of the devices and the silences.
    facts: Arc<dyn Facts>,
    policy: PolicySettings,
    clock: Clock,
    pacing: Pacing,
    client: reqwest::Client,
}

struct Sink {
    spec: SinkSpec,
    enabled: AtomicBool,
    /// The cursor in the database moved (the sink was switched on): reload it.
    reload: AtomicBool,
    wake: Notify,
    delivered: AtomicU64,
    failed: AtomicU64,
    dead: AtomicU64,
    last: Mutex<Last>,
}

#[derive(Default)]
struct Last {
    success_at: Option<Timestamp>,
    error: Option<String>,
}

/// A sink as `GET /api/v1/sinks` shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SinkReport {
    pub name: String,
    /// `webhook`, `telegram` or `slack`.
    pub kind: &'static str,
    pub enabled: bool,
    /// Notifications waiting to be delivered.
    pub backlog: u64,
    /// Age of the oldest of them, in seconds; absent with none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_pending_age_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_success_at: Option<Timestamp>,
    /// The latest failure since this process started, if any (never a secret).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Notifications given up on, kept to retry or drop.
    pub dead_letters: u64,
    /// Deliveries since this process started.
    pub delivered: u64,
    /// Failed attempts since this process started.
    pub failed: u64,
}

/// The answer to a test message.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TestResult {
    pub delivered: bool,
    /// The receiver's HTTP status, when it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("no sink named {0:?}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Sinks {
    /// The configured sinks, with the run-time switches stored in the database.
    pub async fn new(
        specs: Vec<SinkSpec>,
        store: Arc<dyn NotificationStore>,
        facts: Arc<dyn Facts>,
        policy: PolicySettings,
        clock: Clock,
        pacing: Pacing,
    ) -> Result<Arc<Self>, StoreError> {
        let mut sinks = Vec::with_capacity(specs.len());
        for spec in specs {
            let (_, switched) = store.sink_state(&spec.name).await?;
            sinks.push(Arc::new(Sink {
                enabled: AtomicBool::new(switched.unwrap_or(spec.enabled)),
                spec,
                reload: AtomicBool::new(false),
                wake: Notify::new(),
                delivered: AtomicU64::new(0),
                failed: AtomicU64::new(0),
                dead: AtomicU64::new(0),
                last: Mutex::new(Last::default()),
            }));
        }
        // The receivers' answers decide; a redirect is not followed (a POST would
        // turn into a GET): point the sink at the final address instead.
        let client = reqwest::Client::builder()
            .timeout(pacing.timeout)
            .connect_timeout(pacing.timeout.min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("fleetwatch/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        Ok(Arc::new(Self {
            sinks,
            store,
            facts,
            policy,
            clock,
            pacing,
            client,
        }))
    }

    pub fn is_empty(&self) -> bool {
        self.sinks.is_empty()
    }

    /// New transitions were committed: every sink looks.
    pub fn wake(&self) {
        for sink in &self.sinks {
            sink.wake.notify_one();
        }
    }

    /// Runs every sink until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut tasks = JoinSet::new();
        for sink in &self.sinks {
            tasks.spawn(Arc::clone(&self).deliver(Arc::clone(sink), stop.clone()));
        }
        while let Some(done) = tasks.join_next().await {
            if let Err(e) = done {
                tracing::error!(error = %e, "a notification sink's task failed");
            }
        }
    }

    fn sink(&self, name: &str) -> Result<&Arc<Sink>, SinkError> {
        self.sinks
            .iter()
            .find(|s| s.spec.name == name)
            .ok_or_else(|| SinkError::NotFound(name.to_string()))
    }

    pub async fn reports(&self) -> Result<Vec<SinkReport>, StoreError> {
        let mut reports = Vec::with_capacity(self.sinks.len());
        for sink in &self.sinks {
            reports.push(self.report(sink).await?);
        }
        Ok(reports)
    }

    pub async fn report_of(&self, name: &str) -> Result<SinkReport, SinkError> {
        Ok(self.report(self.sink(name)?).await?)
    }

    async fn report(&self, sink: &Sink) -> Result<SinkReport, StoreError> {
        let stats = self.store.queue_stats(&sink.spec.name).await?;
        let now = self.clock.now();
        let (success_at, error) = sink
            .last
            .lock()
            .map(|last| (last.success_at, last.error.clone()))
            .unwrap_or_default();
        Ok(SinkReport {
            name: sink.spec.name.clone(),
            kind: sink.spec.target.kind(),
            enabled: sink.enabled.load(Relaxed),
            backlog: stats.backlog,
            oldest_pending_age_s: stats
                .oldest_pending
                .map(|t| now.millis_since(t).max(0) as f64 / 1e3),
            last_success_at: success_at,
            last_error: error,
            dead_letters: stats.dead_letters,
            delivered: sink.delivered.load(Relaxed),
            failed: sink.failed.load(Relaxed),
        })
    }

    /// Switches a sink on or off, for good (the switch is stored). Switched on, it
    /// hears transitions from then on; what it had queued before is still sent.
    pub async fn set_enabled(&self, name: &str, enabled: bool) -> Result<SinkReport, SinkError> {
        let sink = self.sink(name)?;
        self.store.set_sink_enabled(name, enabled, enabled).await?;
        let was = sink.enabled.swap(enabled, Relaxed);
        if enabled && !was {
            sink.reload.store(true, Relaxed);
        }
        sink.wake.notify_one();
        tracing::info!(sink = name, enabled, "notification sink switched");
        self.report_of(name).await
    }

    /// Sends a test message now and says what the receiver answered.
    pub async fn test(&self, name: &str) -> Result<TestResult, SinkError> {
        let sink = self.sink(name)?;
        let now = self.clock.now();
        let id = format!("test-{}", uuid::Uuid::now_v7());
        let rendered = sink.spec.target.render(Message::Test {
            sink: name,
            at: now,
        });
        let outcome = sink
            .spec
            .target
            .send(&self.client, &id, &rendered, now.unix_millis() / 1000)
            .await;
        Ok(match outcome {
            Outcome::Delivered { status } => TestResult {
                delivered: true,
                status: Some(status),
                error: None,
            },
            Outcome::Retry { error, .. } | Outcome::Dead { error } => TestResult {
                delivered: false,
                status: error.split(' ').next().and_then(|s| s.parse().ok()),
                error: Some(error),
            },
        })
    }

    pub async fn dead_letters(
        &self,
        name: &str,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<crate::storage::notifications::DeadLetter>, SinkError> {
        self.sink(name)?;
        Ok(self.store.dead_letters(name, after_id, limit).await?)
    }

    pub async fn retry_dead(&self, name: &str, id: Option<i64>) -> Result<u64, SinkError> {
        let sink = self.sink(name)?;
        let retried = self.store.retry_dead(name, id, self.clock.now()).await?;
        sink.wake.notify_one();
        Ok(retried)
    }

    pub async fn drop_dead(&self, name: &str, id: Option<i64>) -> Result<u64, SinkError> {
        self.sink(name)?;
        Ok(self.store.drop_dead(name, id).await?)
    }

    /// Prometheus lines per sink.
    pub async fn render_metrics(&self, out: &mut String) {
        if self.sinks.is_empty() {
            return;
        }
        let counters: [(&str, &str, Counter); 3] = [
            (
                "fleetwatch_notifications_delivered_total",
                "Notifications the receiver accepted.",
                |s| s.delivered.load(Relaxed),
            ),
            (
                "fleetwatch_notifications_failed_total",
                "Attempts that failed (each is retried or dead-lettered).",
                |s| s.failed.load(Relaxed),
            ),
            (
                "fleetwatch_notifications_dead_lettered_total",
                "Notifications given up on.",
                |s| s.dead.load(Relaxed),
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for sink in &self.sinks {
                let _ = writeln!(out, "{name}{{sink=\"{}\"}} {}", sink.spec.name, value(sink));
            }
        }
        let mut backlog = String::new();
        let mut age = String::new();
        let mut dead = String::new();
        for sink in &self.sinks {
            let Ok(report) = self.report(sink).await else {
                continue;
            };
            let label = &sink.spec.name;
            let _ = writeln!(
                backlog,
                "fleetwatch_notifications_backlog{{sink=\"{label}\"}} {}",
                report.backlog
            );
            let _ = writeln!(
                age,
                "fleetwatch_notifications_oldest_pending_seconds{{sink=\"{label}\"}} {}",
                report.oldest_pending_age_s.unwrap_or(0.0)
            );
            let _ = writeln!(
                dead,
                "fleetwatch_notifications_dead_letters{{sink=\"{label}\"}} {}",
                report.dead_letters
            );
        }
        for (name, help, lines) in [
            (
                "fleetwatch_notifications_backlog",
                "Notifications waiting to be delivered.",
                backlog,
            ),
            (
                "fleetwatch_notifications_oldest_pending_seconds",
                "Age of the oldest notification waiting (0 when none).",
                age,
            ),
            (
                "fleetwatch_notifications_dead_letters",
                "Notifications given up on, kept.",
                dead,
            ),
        ] {
            let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{lines}");
        }
    }

    /// One sink's loop.
    async fn deliver(self: Arc<Self>, sink: Arc<Sink>, stop: CancellationToken) {
        let name = sink.spec.name.clone();
        let cursor = match self.store.sink_state(&name).await {
            Ok((cursor, _)) => cursor,
            Err(e) => {
                tracing::error!(sink = %name, error = %e, "cannot read the sink's position; it stays idle");
                return;
            }
        };
        let mut run = Run {
            cursor,
            read: cursor,
            engine: Some(Engine::new(self.policy.clone())),
            ..Run::default()
        };
        let mut tick = time::interval(POLL);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut stopping: Option<Instant> = None;
        loop {
            if stopping.is_none() && sink.enabled.load(Relaxed) {
                match self.step(&sink, &mut run).await {
                    Ok(()) => {
                        if let Some(lasted) = run.outage.ended() {
                            tracing::info!(sink = %name, after_s = lasted.as_secs_f64(), "the sink's queue is readable again");
                        }
                    }
                    Err(e) => {
                        run.look_again();
                        if run.outage.failed() {
                            tracing::warn!(sink = %name, error = %e, "cannot read or write the sink's queue; retrying");
                        }
                    }
                }
            }
            if stopping.is_some() && run.in_flight.tasks.is_empty() {
                break;
            }
            let deadline = stopping.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                Some(done) = run.in_flight.tasks.join_next_with_id(), if !run.in_flight.tasks.is_empty() => {
                    let done = run.in_flight.finished(done, &mut run.flying);
                    self.answered(&sink, done, &mut run);
                    while let Some(done) = run.in_flight.tasks.try_join_next_with_id() {
                        let done = run.in_flight.finished(done, &mut run.flying);
                        self.answered(&sink, done, &mut run);
                    }
                    // The receiver is back after failures: what waits for a retry is
                    // tried now, not at its backoff's end (up to notify.retry_max).
                    if std::mem::take(&mut run.back) {
                        self.receiver_back(&sink, &mut run).await;
                    }
                    // Answers are written in batches; a device's next notification can
                    // only go once its predecessor's answer is written, so write as
                    // soon as nothing else is left to send.
                    let idle = run.queue.len() < IN_FLIGHT;
                    if run.answered.len() >= RECORD_BATCH || idle {
                        self.record(&mut run).await;
                    }
                }
                _ = sink.wake.notified(), if stopping.is_none() => run.look_again(),
                _ = tick.tick(), if stopping.is_none() => {
                    run.look_again();
                    self.record(&mut run).await;
                }
                _ = stop.cancelled(), if stopping.is_none() => {
                    stopping = Some(Instant::now() + STOP_WAIT);
                }
                _ = time::sleep_until(deadline), if stopping.is_some() => {
                    run.in_flight.tasks.abort_all();
                    break;
                }
            }
        }
        self.record(&mut run).await;
        if !run.answered.is_empty() {
            tracing::warn!(sink = %name, answers = run.answered.len(), "stopping with answers unrecorded; those notifications are sent again at the next start");
        }
    }

    /// Takes new transitions in, loads what is due, and sends up to the sink's share.
    async fn step(&self, sink: &Arc<Sink>, run: &mut Run) -> Result<(), StoreError> {
        if std::mem::take(&mut run.new_events) {
            match self.take_new(sink, run).await {
                Ok(true) => run.due_in_store = true,
                Ok(false) => {}
                Err(e) => {
                    // What the policy held is decided again from the sink's cursor.
                    if let Some(engine) = run.engine.as_mut() {
                        engine.reset();
                    }
                    run.read = run.cursor;
                    return Err(e);
                }
            }
        }
        // Loaded before the queue runs dry, so the requests in flight never wait for
        // the store.
        if run.queue.len() < IN_FLIGHT * 2 && std::mem::take(&mut run.due_in_store) {
            let due = self
                .store
                .due(&sink.spec.name, self.clock.now(), &run.flying, DUE_PAGE)
                .await?;
            // A full page: there may be more.
            run.due_in_store = due.len() == DUE_PAGE as usize;
            run.flying.extend(due.iter().map(|q| q.id));
            run.queue.extend(due);
        }
        let sent_at = self.clock.now().unix_millis() / 1000;
        while run.in_flight.tasks.len() < IN_FLIGHT {
            let Some(queued) = run.queue.pop_front() else {
                break;
            };
            let notification = queued.id;
            let sink = Arc::clone(sink);
            let client = self.client.clone();
            let task = run.in_flight.tasks.spawn(async move {
                let id = queued.payload.event_id.to_string();
                let outcome = sink
                    .spec
                    .target
                    .send(&client, &id, &queued.payload.body, sent_at)
                    .await;
                (queued, outcome)
            });
            run.in_flight.ids.insert(task.id(), notification);
        }
        Ok(())
    }

    /// Reads the transitions committed after what the sink has read, gives those its
    /// filter matches to the alert policy, and queues what the policy decides, moving
    /// the sink's cursor up to the oldest transition the policy still holds; true if
    /// it queued any.
    async fn take_new(&self, sink: &Sink, run: &mut Run) -> Result<bool, StoreError> {
        let store = &self.store;
        let name = &sink.spec.name;
        let mut engine = run
            .engine
            .take()
            .unwrap_or_else(|| Engine::new(self.policy.clone()));
        if sink.reload.swap(false, Relaxed) {
            run.cursor = store.sink_state(name).await?.0;
            run.read = run.cursor;
            engine.reset();
        }
        let result = self.take_with(sink, run, &mut engine).await;
        run.engine = Some(engine);
        result
    }

    async fn take_with(
        &self,
        sink: &Sink,
        run: &mut Run,
        engine: &mut Engine,
    ) -> Result<bool, StoreError> {
        let store = &self.store;
        let name = &sink.spec.name;
        let mut queued = false;
        if engine.needs_recall() {
            // Devices a silence held before this process started, whose latest
            // transition this sink's filter matches.
            let mut held = Vec::new();
            for device in self.facts.silenced_down(self.clock.now()).await? {
                let latest = self.facts.latest_event(&device.device_id).await?;
                if latest.is_some_and(|e| sink.spec.filter.matches(&e.event)) {
                    held.push(device);
                }
            }
            engine.recall(held);
        }
        loop {
            let events = store.events_after(run.read, PAGE).await?;
            let matched: Vec<&StoredEvent> = events
                .iter()
                .filter(|e| sink.spec.filter.matches(&e.event))
                .collect();
            if !matched.is_empty() {
                let mut ids: Vec<DeviceId> =
                    matched.iter().map(|e| e.event.device_id.clone()).collect();
                ids.sort();
                ids.dedup();
                let known: HashMap<DeviceId, Known> = self
                    .facts
                    .devices(&ids)
                    .await?
                    .iter()
                    .map(|d| (d.device_id.clone(), Known::of(d, &self.policy.deadlines)))
                    .collect();
                for stored in matched {
                    let notice = self.notice(stored).await?;
                    let known = known
                        .get(&stored.event.device_id)
                        .cloned()
                        .unwrap_or_default();
                    engine.observe(stored, notice, known);
                }
            }
            if let Some(last) = events.last() {
                run.read = last.seq;
            }
            let now = self.clock.now();
            let decided = engine.pass(now, self.facts.as_ref()).await?;
            let items: Vec<NewNotification> = decided
                .iter()
                .filter_map(|d| render(&sink.spec, d))
                .collect();
            let to = engine
                .oldest_held()
                .map_or(run.read, |seq| seq - 1)
                .max(run.cursor);
            if to != run.cursor || !items.is_empty() {
                if store.enqueue(name, run.cursor, to, &items, now).await? {
                    run.cursor = to;
                    queued |= !items.is_empty();
                } else {
                    // Another process moved the cursor: start from where it left it.
                    run.cursor = store.sink_state(name).await?.0;
                    run.read = run.cursor;
                    engine.reset();
                }
            }
            if events.len() < PAGE as usize {
                return Ok(queued);
            }
        }
    }

    async fn notice(&self, stored: &crate::event::StoredEvent) -> Result<Notice, StoreError> {
        let event = &stored.event;
        let down_since = if is_recovery(event) {
            self.store
                .previous_change(&event.device_id, stored.seq)
                .await?
        } else {
            None
        };
        Ok(Notice {
            event: event.clone(),
            down_since,
            behind: None,
            reminder: None,
        })
    }

    /// Turns an answer into what to record.
    fn answered(&self, sink: &Sink, done: Option<(Queued, Outcome)>, run: &mut Run) {
        let Some((queued, outcome)) = done else {
            return;
        };
        let now = self.clock.now();
        let attempts = queued.attempts.saturating_add(1);
        let settled = match outcome {
            Outcome::Delivered { .. } => {
                sink.delivered.fetch_add(1, Relaxed);
                run.back |= std::mem::take(&mut run.failing);
                if let Ok(mut last) = sink.last.lock() {
                    last.success_at = Some(now);
                }
                Settled::Delivered { id: queued.id }
            }
            Outcome::Retry { error, after } => {
                sink.failed.fetch_add(1, Relaxed);
                run.failing = true;
                let age = Duration::from_millis(now.millis_since(queued.created_at).max(0) as u64);
                if age >= self.pacing.max_age {
                    let error = format!(
                        "gave up after {attempts} attempts over {}: {error}",
                        humantime::format_duration(Duration::from_secs(age.as_secs()))
                    );
                    self.dead(sink, &queued, &error);
                    Settled::Dead {
                        id: queued.id,
                        attempts,
                        error,
                    }
                } else {
                    let wait = backoff(attempts, after, self.pacing.retry_max);
                    self.failed(sink, &queued, &error, wait);
                    Settled::Retry {
                        id: queued.id,
                        attempts,
                        next_attempt_at: now.saturating_add(wait),
                        error,
                    }
                }
            }
            Outcome::Dead { error } => {
                sink.failed.fetch_add(1, Relaxed);
                self.dead(sink, &queued, &error);
                Settled::Dead {
                    id: queued.id,
                    attempts,
                    error,
                }
            }
        };
        run.answered.push(settled);
    }

    fn failed(&self, sink: &Sink, queued: &Queued, error: &str, wait: Duration) {
        tracing::debug!(sink = %sink.spec.name, device_id = %queued.payload.device_id, error, retry_in_ms = wait.as_millis() as u64, "notification not delivered; retrying");
        let first = sink
            .last
            .lock()
            .map(|mut last| last.error.replace(error.to_string()).is_none())
            .unwrap_or(false);
        if first {
            tracing::warn!(sink = %sink.spec.name, error, "a notification could not be delivered; retrying with backoff");
        }
    }

    fn dead(&self, sink: &Sink, queued: &Queued, error: &str) {
        sink.dead.fetch_add(1, Relaxed);
        if let Ok(mut last) = sink.last.lock() {
            last.error = Some(error.to_string());
        }
        tracing::warn!(
            sink = %sink.spec.name,
            device_id = %queued.payload.device_id,
            event_id = %queued.payload.event_id,
            error,
            "notification given up on (dead letter)"
        );
    }

    async fn receiver_back(&self, sink: &Sink, run: &mut Run) {
        // Recorded first: an answer recorded after would put its notification back
        // at the end of its backoff.
        self.record(run).await;
        match self.store.due_now(&sink.spec.name, self.clock.now()).await {
            Ok(moved) => {
                tracing::info!(sink = %sink.spec.name, retried_now = moved, "the receiver answers again; sending what waited");
                run.due_in_store = true;
            }
            Err(e) => {
                tracing::warn!(sink = %sink.spec.name, error = %e, "could not bring waiting notifications forward")
            }
        }
    }

    /// Writes the answers down; those written are no longer in flight, and the
    /// notifications behind them may be due.
    async fn record(&self, run: &mut Run) {
        if run.answered.is_empty() {
            return;
        }
        if self.store.settle(&run.answered).await.is_ok() {
            let done: std::collections::HashSet<i64> =
                run.answered.iter().map(settled_id).collect();
            run.flying.retain(|id| !done.contains(id));
            run.answered.clear();
            run.due_in_store = true;
        }
    }
}

/// A sink loop's state.
struct Run {
    /// Its position in the event log: everything up to it is decided (stored).
    cursor: i64,
    /// Read up to here; what lies between `cursor` and here the policy holds.
    read: i64,
    /// The alert policy (taken out while it works).
    engine: Option<Engine>,
    /// The log may hold transitions past `cursor`.
    new_events: bool,
    /// The store may hold due notifications not loaded into `queue`.
    due_in_store: bool,
    /// Loaded, due, not yet sent.
    queue: std::collections::VecDeque<Queued>,
    in_flight: InFlight,
    /// Loaded, in flight, or answered but not yet recorded: not to be loaded again.
    flying: Vec<i64>,
    answered: Vec<Settled>,
    outage: Outage,
    /// Attempts have failed since the last delivery.
    failing: bool,
    /// A delivery succeeded after failures.
    back: bool,
}

impl Default for Run {
    fn default() -> Self {
        Self {
            cursor: 0,
            read: 0,
            engine: None,
            new_events: true,
            due_in_store: true,
            queue: Default::default(),
            in_flight: InFlight::default(),
            flying: Vec::new(),
            answered: Vec::new(),
            outage: Outage::default(),
            failing: false,
            back: false,
        }
    }
}

impl Run {
    /// Woken, or a poll: look at the log and the store again.
    fn look_again(&mut self) {
        self.new_events = true;
        self.due_in_store = true;
    }
}

/// A decided message as the sink's queue holds it.
fn render(spec: &SinkSpec, decided: &Decided) -> Option<NewNotification> {
    Some(match decided {
        Decided::One { key, notice } => NewNotification {
            event_seq: *key,
            payload: Payload {
                device_id: notice.event.device_id.clone(),
                event_id: notice_id(*key, notice),
                kind: notice.kind().to_string(),
                body: spec.target.render(Message::Notice(notice)),
            },
        },
        Decided::Group { key, notice } => {
            let first = notice.events.first()?;
            NewNotification {
                event_seq: *key,
                payload: Payload {
                    // Queued in the order of its first member's device.
                    device_id: first.event.device_id.clone(),
                    event_id: notice_id(*key, first),
                    kind: notice.kind(),
                    body: spec.target.render(Message::Group(notice)),
                },
            }
        }
    })
}

/// A message's idempotency key: its transition's event id, or for a reminder one
/// made from it and the reminder's number.
fn notice_id(key: i64, notice: &Notice) -> uuid::Uuid {
    match notice.reminder {
        None => notice.event.event_id,
        Some(_) => uuid::Uuid::new_v5(&notice.event.event_id, &key.to_be_bytes()),
    }
}

/// A sink's requests in flight, each task known by the notification it sends.
#[derive(Default)]
struct InFlight {
    tasks: JoinSet<(Queued, Outcome)>,
    ids: std::collections::HashMap<tokio::task::Id, i64>,
}

impl InFlight {
    /// A finished task's answer; `None` if it panicked or was cancelled, in which case
    /// its notification stays pending and may be sent again.
    fn finished(
        &mut self,
        done: Result<(tokio::task::Id, (Queued, Outcome)), tokio::task::JoinError>,
        flying: &mut Vec<i64>,
    ) -> Option<(Queued, Outcome)> {
        match done {
            Ok((task, answer)) => {
                self.ids.remove(&task);
                Some(answer)
            }
            Err(e) => {
                if let Some(notification) = self.ids.remove(&e.id()) {
                    flying.retain(|id| *id != notification);
                }
                None
            }
        }
    }
}

/// Reads one of a sink's counters.
type Counter = fn(&Sink) -> u64;

fn settled_id(settled: &Settled) -> i64 {
    match settled {
        Settled::Delivered { id } | Settled::Retry { id, .. } | Settled::Dead { id, .. } => *id,
    }
}

/// The pause before attempt `attempts + 1`: doubling from [`RETRY_FIRST`], at most
/// `max`, somewhere in its upper half (jitter, so a sink's retries after an outage do
/// not arrive all at once), or what the receiver asked for if that is longer.
fn backoff(attempts: u32, asked: Option<Duration>, max: Duration) -> Duration {
    let exponent = attempts.saturating_sub(1).min(16);
    let full = RETRY_FIRST.saturating_mul(1 << exponent).min(max);
    let jittered = full.mul_f64(0.5 + fastrand::f64() * 0.5);
    asked.map_or(jittered, |asked| asked.max(jittered)).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let max = Duration::from_secs(60);
        for _ in 0..100 {
            let first = backoff(1, None, max);
            assert!(
                (Duration::from_millis(500)..=RETRY_FIRST).contains(&first),
                "{first:?}"
            );
            let fourth = backoff(4, None, max);
            assert!((Duration::from_secs(4)..=Duration::from_secs(8)).contains(&fourth));
            let late = backoff(30, None, max);
            assert!((Duration::from_secs(30)..=max).contains(&late), "{late:?}");
        }
        assert_eq!(
            backoff(1, Some(Duration::from_secs(7)), max),
            Duration::from_secs(7),
            "the receiver's Retry-After"
        );
        assert_eq!(backoff(1, Some(Duration::from_secs(600)), max), max);
        assert!(backoff(3, None, Duration::from_millis(100)) <= Duration::from_millis(100));
    }
}
