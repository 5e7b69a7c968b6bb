//! The offline checker: finds devices whose deadline (`last_seen_at + offline_after`)
//! has passed and takes them offline, exactly once.
//!
//! A pass is careful about two kinds of silence that are not the device's fault:
//! heartbeats the hub has received but not yet committed (it asks the handler to
//! flush first, through the same queue, so everything heard before the pass counts),
//! and time the hub could not hear at all (startup grace: no device goes offline
//! until the hub has been subscribed for a full `offline_after`).

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
    /// Subscribed, but not yet for `offline_after`: nobody can be overdue.
    Grace { until: Timestamp },
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

/// The cutoff for a pass at `now`: devices last seen before it are overdue. `Err`
/// says why no device can be overdue yet.
pub fn cutoff(
    now: Timestamp,
    offline_after: Duration,
    listening_since: Option<Timestamp>,
) -> Result<Timestamp, Pass> {
    let since = listening_since.ok_or(Pass::NotListening)?;
    let cutoff = now.saturating_sub(offline_after);
    if since > cutoff {
        // Every device has been heard of, or could have been, after `since`.
        return Err(Pass::Grace {
            until: since.saturating_add(offline_after),
        });
    }
    Ok(cutoff)
}

pub struct OfflineChecker {
    store: Arc<dyn Store>,
    clock: Clock,
    /// When the system clock was last set: silence is only measured after it, like
    /// after a reconnect.
    clock_set_at: std::sync::Mutex<Option<Timestamp>>,
    offline_after: Duration,
    listening: Listening,
    flush: FlushHandle,
    alerts: AlertChannel,
    metrics: Arc<Metrics>,
}

impl OfflineChecker {
    pub fn new(
        store: Arc<dyn Store>,
        clock: Clock,
        offline_after: Duration,
        listening: Listening,
        flush: FlushHandle,
        alerts: AlertChannel,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            clock,
            clock_set_at: std::sync::Mutex::new(None),
            offline_after,
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
        let cutoff = match cutoff(asked_at, self.offline_after, listening_since) {
            Ok(cutoff) => cutoff,
            Err(skip) => return Ok(skip),
        };
        // Everything received before `asked_at` is committed after this, so a device
        // still older than `cutoff` really was silent for `offline_after`. The pass is
        // dated `asked_at`: anything committed after it was received after it, so a
        // device's `changed_at` never runs backwards.
        self.flush.flush().await?;
        let events = self.store.mark_offline(cutoff, asked_at).await?;
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
                Ok(Pass::Grace { until }) => {
                    tracing::debug!(until = %until, "offline check skipped: startup grace")
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

    fn harness(offline_after: Duration) -> Harness {
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
            offline_after,
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
        let h = harness(Duration::from_secs(180));
        assert_eq!(
            h.checker.check_once().await.expect("pass"),
            Pass::NotListening
        );
        assert!(h.store.passes.lock().expect("lock").is_empty());
        assert_eq!(*h.flushes.lock().expect("lock"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn startup_grace_lasts_offline_after_from_subscription() {
        let offline_after = Duration::from_secs(180);
        let h = harness(offline_after);
        let since = h.clock.now();
        h.listening.send_replace(Some(since));
        h.store.watched.lock().expect("lock").push((
            device("old"),
            since.saturating_sub(Duration::from_secs(3600)),
        ));

        time::advance(offline_after - Duration::from_millis(1)).await;
        assert_eq!(
            h.checker.check_once().await.expect("pass"),
            Pass::Grace {
                until: since.saturating_add(offline_after)
            }
        );

        time::advance(Duration::from_millis(2)).await;
        let Pass::Checked(events) = h.checker.check_once().await.expect("pass") else {
            panic!("grace should be over");
        };
        assert_eq!(events.len(), 1);
        let (cutoff, now) = h.store.passes.lock().expect("lock")[0];
        assert_eq!(now.millis_since(cutoff), 180_000);
        assert_eq!(
            *h.flushes.lock().expect("lock"),
            1,
            "a pass flushes before it checks"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_reconnect_restarts_the_grace() {
        let offline_after = Duration::from_secs(10);
        let h = harness(offline_after);
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
        h.listening.send_replace(Some(h.clock.now()));
        assert!(matches!(
            h.checker.check_once().await.expect("pass"),
            Pass::Grace { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn with_default_settings_silence_is_reported_within_a_second_of_the_deadline() {
        let defaults = Settings::default().heartbeat;
        let h = harness(defaults.offline_after);
        let start = h.clock.now();
        h.listening.send_replace(Some(start));
        // Deadlines staggered across ten seconds, well after the grace.
        let last_seen: Vec<_> = (0..40)
            .map(|i| {
                (
                    device(&format!("d{i}")),
                    start.saturating_add(Duration::from_millis(200_000 + 250 * i + 7 * (i % 3))),
                )
            })
            .collect();
        h.store
            .watched
            .lock()
            .expect("lock")
            .extend(last_seen.iter().cloned());

        let shutdown = CancellationToken::new();
        let store = Arc::clone(&h.store);
        let run = tokio::spawn(h.checker.run(defaults.check_interval, shutdown.clone()));
        time::sleep(Duration::from_secs(400)).await;
        shutdown.cancel();
        run.await.expect("checker stops");

        assert!(
            store.watched.lock().expect("lock").is_empty(),
            "every device was taken"
        );
        let passes = store.passes.lock().expect("lock").clone();
        for (id, seen) in &last_seen {
            let deadline = seen.saturating_add(defaults.offline_after);
            let (_, taken_at) = passes
                .iter()
                .find(|(cutoff, _)| *seen < *cutoff)
                .unwrap_or_else(|| panic!("{id} never taken"));
            let lag = taken_at.millis_since(deadline);
            assert!(
                (0..=1_000).contains(&lag),
                "{id}: reported {lag} ms after its deadline"
            );
        }
    }
}
