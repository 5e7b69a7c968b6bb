//! The offline checker: finds devices whose deadline (`last_seen_at` plus the
//! device's own `offline_after`, [`crate::deadline`]) has passed and takes them
//! offline, exactly once.
//!
//! A pass is careful about two kinds of silence that are not the device's fault:
//! heartbeats the hub has received but not yet committed (it asks the handler to
//! flush first, through the same queue, so everything heard before the pass counts),
//! and time the hub could not hear at all (startup grace: no device goes offline
//! until the hub has been subscribed for a full `offline_after` of that device's).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{self, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::alerts::AlertChannel;
use crate::clock::{Clock, Timestamp};
use crate::event::StatusEvent;
use crate::health::Outage;
use crate::heartbeat::{FlushError, FlushHandle};
use crate::metrics::Metrics;
use crate::storage::{Store, StoreError};

/// Since when the hub has been continuously subscribed to heartbeats; `None` while its
/// broker connection is down. Written by the MQTT subscriber.
pub type Listening = watch::Receiver<Option<Timestamp>>;

/// What one pass did.
#[derive(Debug, PartialEq, Eq)]
pub enum Pass {
    /// The hub is not subscribed: it cannot tell silence from deafness.
    NotListening,
    /// Devices taken offline, in one transaction.
    Checked(Vec<StatusEvent>),
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Flush(#[from] FlushError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct OfflineChecker {
    store: Arc<dyn Store>,
    clock: Clock,
    /// When the system clock was last set: silence is only measured after it, like
    /// after a reconnect.
    clock_set_at: std::sync::Mutex<Option<Timestamp>>,
    listening: Listening,
    flush: FlushHandle,
    alerts: AlertChannel,
    metrics: Arc<Metrics>,
}

impl OfflineChecker {
    pub fn new(
        store: Arc<dyn Store>,
        clock: Clock,
        listening: Listening,
        flush: FlushHandle,
        alerts: AlertChannel,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            clock,
            clock_set_at: std::sync::Mutex::new(None),
            listening,
            flush,
            alerts,
            metrics,
        }
    }

    /// One pass.
    pub async fn check_once(&self) -> Result<Pass, CheckError> {
        if let Some(step) = self.clock.resync() {
            tracing::warn!(
                step_ms = step,
                "the system clock was set; offline checks restart their grace"
            );
            if let Ok(mut set_at) = self.clock_set_at.lock() {
                *set_at = Some(self.clock.now());
            }
        }
        let asked_at = self.clock.now();
        let clock_set_at = self.clock_set_at.lock().ok().and_then(|set_at| *set_at);
        let listening_since = (*self.listening.borrow()).map(|since| match clock_set_at {
            Some(set_at) => since.max(set_at),
            None => since,
        });
        let Some(heard_since) = listening_since else {
            return Ok(Pass::NotListening);
        };
        // Everything received before `asked_at` is committed after this, so a device
        // whose deadline is still before it really was silent for its `offline_after`.
        // The pass is dated `asked_at`: anything committed after it was received after
        // it, so a device's `changed_at` never runs backwards.
        self.flush.flush().await?;
        let events = self.store.mark_offline(asked_at, heard_since).await?;
        self.alerts.committed(&events);
        Ok(Pass::Checked(events))
    }

    /// A pass every `interval` until `shutdown`.
    pub async fn run(self, interval: Duration, shutdown: CancellationToken) {
        let mut outage = Outage::default();
        let mut ticker = time::interval(interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let started = Instant::now();
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                result = self.check_once() => result,
            };
            self.metrics.check.observe_duration(started.elapsed());
            let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
            if result.is_ok()
                && let Some(lasted) = outage.ended()
            {
                tracing::info!(after_s = lasted.as_secs_f64(), "offline checks work again");
            }
            match result {
                Ok(Pass::Checked(events)) => {
                    tracing::debug!(went_offline = events.len(), elapsed_ms, "offline check")
                }
                Ok(Pass::NotListening) => {
                    tracing::debug!("offline check skipped: not subscribed to the broker")
                }
                Err(CheckError::Flush(FlushError::Stopped)) => return,
                Err(e) => {
                    self.metrics.check_errors.fetch_add(1, Relaxed);
                    if outage.failed() {
                        tracing::warn!(error = %e, "offline check failed; retrying every interval");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::sync::mpsc;

    use super::*;
    use crate::config::Settings;
    use crate::device::DeviceId;
    use crate::heartbeat::Inbound;
    use crate::storage::fake::FakeStore;

    struct Harness {
        checker: OfflineChecker,
        store: Arc<FakeStore>,
        listening: watch::Sender<Option<Timestamp>>,
        flushes: Arc<Mutex<u32>>,
        clock: Clock,
    }

    fn harness() -> Harness {
        let store = Arc::new(FakeStore::default());
        let clock = Clock::starting_at(Timestamp::from_unix_millis(1_000_000));
        let (listening, listening_rx) = watch::channel(None);
        let (queue, mut inbox) = mpsc::channel(8);
        let flushes = Arc::new(Mutex::new(0));
        let counted = Arc::clone(&flushes);
        tokio::spawn(async move {
            while let Some(message) = inbox.recv().await {
                if let Inbound::Flush { reply } = message {
                    *counted.lock().expect("lock") += 1;
                    let _ = reply.send(Ok(()));
                }
            }
        });
        let metrics = Arc::new(Metrics::default());
        let checker = OfflineChecker::new(
            Arc::clone(&store) as Arc<dyn Store>,
            clock.clone(),
            listening_rx,
            FlushHandle::new(queue),
            AlertChannel::new(Arc::clone(&metrics)),
            metrics,
        );
        Harness {
            checker,
            store,
            listening,
            flushes,
            clock,
        }
    }

    fn device(s: &str) -> DeviceId {
        DeviceId::parse(s).expect("valid id")
    }

    #[tokio::test(start_paused = true)]
    async fn no_pass_while_not_subscribed() {
        let h = harness();
        assert_eq!(
            h.checker.check_once().await.expect("pass"),
            Pass::NotListening
        );
        assert!(h.store.passes.lock().expect("lock").is_empty());
        assert_eq!(*h.flushes.lock().expect("lock"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pass_flushes_then_asks_for_devices_silent_since_the_subscription() {
        let h = harness();
        let since = h.clock.now();
        h.listening.send_replace(Some(since));
        time::advance(Duration::from_secs(5)).await;
        assert!(matches!(
            h.checker.check_once().await.expect("pass"),
            Pass::Checked(_)
        ));
        assert_eq!(
            h.store.passes.lock().expect("lock").as_slice(),
            &[(since.saturating_add(Duration::from_secs(5)), since)]
        );
        assert_eq!(
            *h.flushes.lock().expect("lock"),
            1,
            "a pass flushes before it checks"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn startup_grace_lasts_each_devices_own_offline_after_from_subscription() {
        let h = harness();
        let since = h.clock.now();
        h.listening.send_replace(Some(since));
        let long_ago = since.saturating_sub(Duration::from_secs(3600));
        h.store.watched.lock().expect("lock").extend([
            (device("short"), long_ago, Duration::from_secs(10)),
            (device("long"), long_ago, Duration::from_secs(180)),
        ]);
        let taken = |pass: Pass| match pass {
            Pass::Checked(events) => events
                .into_iter()
                .map(|e| e.device_id.to_string())
                .collect::<Vec<_>>(),
            other => panic!("no check: {other:?}"),
        };

        time::advance(Duration::from_secs(9)).await;
        assert!(taken(h.checker.check_once().await.expect("pass")).is_empty());
        time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            taken(h.checker.check_once().await.expect("pass")),
            ["short"]
        );
        time::advance(Duration::from_secs(168)).await;
        assert!(taken(h.checker.check_once().await.expect("pass")).is_empty());
        time::advance(Duration::from_secs(2)).await;
        assert_eq!(taken(h.checker.check_once().await.expect("pass")), ["long"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reconnect_restarts_the_grace() {
        let h = harness();
        h.listening.send_replace(Some(h.clock.now()));
        time::advance(Duration::from_secs(60)).await;
        assert!(matches!(
            h.checker.check_once().await.expect("pass"),
            Pass::Checked(_)
        ));
        h.listening.send_replace(None);
        assert_eq!(
            h.checker.check_once().await.expect("pass"),
            Pass::NotListening
        );
        let back = h.clock.now();
        h.listening.send_replace(Some(back));
        h.checker.check_once().await.expect("pass");
        let passes = h.store.passes.lock().expect("lock").clone();
        assert_eq!(
            passes.last(),
            Some(&(back, back)),
            "heard only since the reconnect"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn with_default_settings_silence_is_reported_within_a_second_of_the_deadline() {
        let defaults = Settings::default().heartbeat;
        let h = harness();
        let start = h.clock.now();
        h.listening.send_replace(Some(start));
        // Mixed offline_after, deadlines staggered across ten seconds, well after the
        // grace.
        let watched: Vec<_> = (0..40)
            .map(|i| {
                let offline_after = Duration::from_secs(200 + 20 * (i % 4));
                let deadline =
                    start.saturating_add(Duration::from_millis(400_000 + 250 * i + 7 * (i % 3)));
                (
                    device(&format!("d{i}")),
                    deadline.saturating_sub(offline_after),
                    offline_after,
                )
            })
            .collect();
        h.store
            .watched
            .lock()
            .expect("lock")
            .extend(watched.iter().cloned());

        let shutdown = CancellationToken::new();
        let store = Arc::clone(&h.store);
        let run = tokio::spawn(h.checker.run(defaults.check_interval, shutdown.clone()));
        time::sleep(Duration::from_secs(500)).await;
        shutdown.cancel();
        run.await.expect("checker stops");

        assert!(
            store.watched.lock().expect("lock").is_empty(),
            "every device was taken"
        );
        let taken = store.taken.lock().expect("lock").clone();
        for (id, seen, offline_after) in &watched {
            let deadline = seen.saturating_add(*offline_after);
            let taken_at = taken
                .iter()
                .find(|(taken, _)| taken == id)
                .map(|(_, at)| *at)
                .unwrap_or_else(|| panic!("{id} never taken"));
            let lag = taken_at.millis_since(deadline);
            assert!(
                (0..=1_000).contains(&lag),
                "{id}: reported {lag} ms after its deadline"
            );
        }
    }
}
