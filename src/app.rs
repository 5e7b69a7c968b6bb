//! The hub assembled: [`Application::build`] opens the database and the broker (so
//! start-up errors surface before anything runs), [`Application::run_until_stopped`]
//! runs the pipeline until the shutdown future resolves, then stops it in order.
//!
//! ```text
//! broker -> Subscriber -> queue -> HeartbeatHandler -> store (outbox) -> Publisher -> broker
//!                                        ^
//!                            OfflineChecker (flush, then mark_offline)
//! ```
//!
//! The HTTP server (API, dashboard, health, metrics) reads the store and feeds HTTP
//! heartbeats into the same queue as MQTT ones.
//!
//! Shutdown order: stop taking messages (HTTP server, subscriber) and checking; the
//! handler drains the queue and commits its last batch; then the publisher delivers
//! what is left.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::alerts::AlertChannel;
use crate::checker::{Listening, OfflineChecker};
use crate::clock::{Clock, Timestamp};
use crate::config::{BrokerMode, ConfigError, Settings};
use crate::health::{Health, RecordWrites, Thresholds};
use crate::heartbeat::{FlushHandle, HeartbeatHandler, Limits, Unsaved};
use crate::http::{self, ConnectionLimits, HttpState, RequestLimits};
use crate::metrics::Metrics;
use crate::mqtt::broker::{BrokerError, EmbeddedBroker, PROBE_KEEP_ALIVE};
use crate::mqtt::logins::{HubLogin, Logins};
use crate::mqtt::publisher::{DRAIN_TIMEOUT, Publisher};
use crate::mqtt::subscriber::Subscriber;
use crate::mqtt::{Endpoint, broker_packet_limit};
use crate::notify::policy::StoreFacts;
use crate::notify::{Pacing, Sinks};
use crate::open_files::{self, Budget};
use crate::storage::leader::Leadership;
use crate::storage::{self, Store, StoreError};
use tokio_util::task::AbortOnDropHandle;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("database.url: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("http.listen {0}: {1}")]
    Http(SocketAddr, std::io::Error),
}

/// Why the hub stopped other than by request, or what it could not finish.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the {0} failed; the hub stopped")]
    Failed(&'static str),
    #[error(transparent)]
    Unsaved(#[from] Unsaved),
}

pub struct Application {
    settings: Settings,
    clock: Clock,
    store: Arc<dyn Store>,
    sinks: Arc<Sinks>,
    leadership: Arc<dyn Leadership>,
    /// The event log, for live views that follow it.
    log: Arc<dyn storage::NotificationStore>,
    metrics: Arc<Metrics>,
    endpoint: Endpoint,
    broker: Option<EmbeddedBroker>,
    listening: (watch::Sender<Option<Timestamp>>, Listening),
    health: Arc<Health>,
    /// How the open-file limit is shared.
    files: Budget,
    http: TcpListener,
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Self, StartError> {
        Self::build_with_clock(settings, Clock::new()).await
    }

    pub async fn build_with_clock(settings: Settings, clock: Clock) -> Result<Self, StartError> {
        settings.validate()?;
        let files = open_files::budget(
            open_files::raise_limit(),
            settings.http.max_connections,
            settings.mqtt.broker == BrokerMode::Embedded,
        );
        report_budget(&files);
        let stores =
            storage::connect_all(&settings.database, settings.heartbeat.deadlines()).await?;
        let sinks = Sinks::new(
            settings.sinks()?,
            Arc::clone(&stores.notifications),
            Arc::new(StoreFacts(Arc::clone(&stores.devices))),
            settings.policy()?,
            clock.clone(),
            Pacing {
                retry_max: settings.notify.retry_max,
                timeout: settings.notify.timeout,
                max_age: settings.notify.max_age,
            },
        )
        .await?;
        let leadership = Arc::clone(&stores.leadership);
        let log = Arc::clone(&stores.notifications);
        let store = stores.devices;
        let http = http::bind(settings.http.listen)
            .map_err(|e| StartError::Http(settings.http.listen, e))?;
        let client_id = if settings.mqtt.client_id.is_empty() {
            // Unique per start, so two hubs on one broker never take over each other.
            let random = uuid::Uuid::now_v7().simple().to_string();
            format!("fleetwatch-{}", &random[random.len() - 8..])
        } else {
            settings.mqtt.client_id.clone()
        };
        let max_payload = settings.heartbeat.max_payload;
        let (broker, host, port, credentials, tls) = match settings.mqtt.broker {
            BrokerMode::Embedded => {
                // With logins required, the hub's own connections log in too.
                let hub_login = settings
                    .mqtt
                    .require_login
                    .then(|| HubLogin::generate(&client_id))
                    .transpose()
                    .map_err(|e| BrokerError::Start(format!("no randomness for a login: {e}")))?;
                let logins = hub_login
                    .clone()
                    .map(|hub| Logins::new(hub, Arc::clone(&store)));
                let broker = EmbeddedBroker::start(
                    settings.mqtt.listen,
                    broker_packet_limit(max_payload),
                    logins,
                )
                .await?;
                let addr = broker.local_addr();
                let credentials = hub_login.as_ref().map(HubLogin::credentials);
                (
                    Some(broker),
                    addr.ip().to_string(),
                    addr.port(),
                    credentials,
                    None,
                )
            }
            BrokerMode::External => {
                let external = settings.external_broker()?;
                // Read now: a missing CA file stops start-up, naming mqtt.ca_file.
                let tls = match &external.tls {
                    Some(files) => Some(files.client_config().map_err(ConfigError::from)?),
                    None => None,
                };
                let credentials = external
                    .login
                    .map(|(user, password)| (user, password.expose().to_string()));
                (None, external.host, external.port, credentials, tls)
            }
        };
        let endpoint = Endpoint {
            host,
            port,
            credentials,
            tls,
            client_id,
            max_payload,
            shared_group: Some(settings.mqtt.shared_group.clone()).filter(|g| !g.is_empty()),
        };
        let listening = watch::channel(None);
        let embedded = broker
            .as_ref()
            .map(|_| endpoint.options("health", PROBE_KEEP_ALIVE));
        let health = Arc::new(Health::new(
            Thresholds {
                commit_lag: settings.health.commit_lag,
                publish_lag: settings.health.publish_lag,
            },
            listening.1.clone(),
            embedded,
        ));
        let store = Arc::new(RecordWrites::new(store, Arc::clone(&health)));
        Ok(Self {
            settings,
            clock,
            store,
            sinks,
            leadership,
            log,
            metrics: Arc::new(Metrics::default()),
            endpoint,
            broker,
            listening,
            health,
            files,
            http,
        })
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    pub fn store(&self) -> Arc<dyn Store> {
        Arc::clone(&self.store)
    }

    /// Since when the hub has been subscribed to heartbeats (`None`: not yet, or its
    /// broker connection is down).
    pub fn listening(&self) -> Listening {
        self.listening.1.clone()
    }

    /// Where the HTTP server listens (the real port when configured with port 0).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.local_addr().ok()
    }

    /// The embedded broker's address, if the hub runs one.
    pub fn embedded_broker(&self) -> Option<SocketAddr> {
        self.broker.as_ref().map(EmbeddedBroker::local_addr)
    }

    /// Runs the hub until `shutdown` resolves, then shuts down in order. An error
    /// means a part failed on its own (a task panicked, or the embedded broker stopped
    /// accepting connections), after which the rest is shut down as well.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), RunError> {
        let hb = &self.settings.heartbeat;
        let mut alerts =
            AlertChannel::new(Arc::clone(&self.metrics)).with_sinks(Arc::clone(&self.sinks));
        // A database other hubs may share: viewers follow the log, so each hub's
        // dashboard shows every hub's transitions.
        let shared = !self.settings.database.url.starts_with("sqlite:");
        if shared {
            alerts = alerts.with_live_from_log();
        }
        let live_changed = Arc::new(tokio::sync::Notify::new());
        let _hearing = hear_commits(
            Arc::clone(&self.leadership),
            vec![alerts.outbox_changed(), Arc::clone(&live_changed)],
            Arc::clone(&self.sinks),
        );
        let _following = shared.then(|| {
            AbortOnDropHandle::new(tokio::spawn(crate::alerts::follow_log(
                Arc::clone(&self.log),
                alerts.clone(),
                live_changed,
            )))
        });
        let (queue, inbox) = mpsc::channel(hb.queue_capacity);
        let ingest_stop = CancellationToken::new();
        let publish_stop = CancellationToken::new();
        let (listening_tx, listening) = self.listening;
        let queue_for_http = queue.downgrade();

        let handler = HeartbeatHandler::new(
            Arc::clone(&self.store),
            alerts.clone(),
            Arc::clone(&self.metrics),
            Arc::clone(&self.health),
            Limits {
                flush_interval: hb.flush_interval,
                max_batch: hb.max_batch,
                max_uncommitted: hb.max_uncommitted,
                max_uncommitted_bytes: hb.max_uncommitted_bytes,
            },
            self.settings.devices.policy(),
        );
        let mut handler_task = tokio::spawn(handler.run(inbox));

        let checker = OfflineChecker::new(
            Arc::clone(&self.store),
            self.clock.clone(),
            listening,
            FlushHandle::new(queue.clone()),
            alerts.clone(),
            Arc::clone(&self.metrics),
        );
        let mut checker_task = tokio::spawn(checker.run(hb.check_interval, ingest_stop.clone()));

        let subscriber = Subscriber::new(
            self.endpoint.clone(),
            self.clock.clone(),
            queue,
            listening_tx,
            Arc::clone(&self.metrics),
        );
        let mut subscriber_task = tokio::spawn(subscriber.run(ingest_stop.clone()));

        let outbox = Outbox {
            leadership: Arc::clone(&self.leadership),
            endpoint: self.endpoint.clone(),
            store: Arc::clone(&self.store),
            wake: alerts.outbox_changed(),
            metrics: Arc::clone(&self.metrics),
            health: Arc::clone(&self.health),
            clock: self.clock.clone(),
            sinks: Arc::clone(&self.sinks),
        };
        let mut publisher_task = tokio::spawn(outbox.run(publish_stop.clone()));

        let keys = self.settings.http.keys();
        if keys.is_empty() {
            tracing::warn!(listen = %self.settings.http.listen, "the HTTP API has no API key: anyone who can reach this loopback address can use it");
        }
        let closing = CancellationToken::new();
        let router = http::router(
            HttpState {
                store: Arc::clone(&self.store),
                metrics: Arc::clone(&self.metrics),
                clock: self.clock.clone(),
                queue: queue_for_http,
                alerts: alerts.clone(),
                keys: keys.into(),
                max_payload: hb.max_payload,
                max_devices: self.settings.devices.policy().max_devices,
                health: Arc::clone(&self.health),
                sinks: Arc::clone(&self.sinks),
                closing: closing.clone(),
            },
            RequestLimits {
                max_requests: self.settings.http.max_requests,
                timeout: self.settings.http.request_timeout,
            },
        );
        let connections = ConnectionLimits {
            max_connections: self.files.http_connections,
            header_timeout: self.settings.http.header_timeout,
        };
        let http_addr = self.http.local_addr().ok();
        let mut http_task = tokio::spawn({
            let closing = closing.clone();
            async move {
                let stop = closing.cancelled_owned();
                if let Err(e) = http::serve(self.http, router, connections, stop).await {
                    tracing::error!(error = %e, "the HTTP server failed");
                }
            }
        });
        let probe = self.endpoint.options("probe", PROBE_KEEP_ALIVE);
        let broker_watch = async move {
            match self.broker {
                Some(broker) => broker.supervise(probe).await,
                None => std::future::pending().await,
            }
        };

        tracing::info!(
            broker = ?self.settings.mqtt.broker,
            mqtt = %format!("{}:{}", self.endpoint.host, self.endpoint.port),
            http = ?http_addr,
            database = %self.settings.database.redacted_url(),
            offline_after = %humantime::format_duration(hb.offline_after),
            "fleetwatch ready"
        );

        let failed = tokio::select! {
            () = shutdown => None,
            failure = broker_watch => {
                tracing::error!("{failure}");
                Some("embedded broker")
            }
            _ = &mut subscriber_task => Some("subscriber"),
            _ = &mut checker_task => Some("offline checker"),
            _ = &mut handler_task => Some("heartbeat handler"),
            _ = &mut publisher_task => Some("status publisher"),
            _ = &mut http_task => Some("HTTP server"),
        };
        if let Some(part) = failed {
            tracing::error!(part, "shutting down after a failure");
        }
        tracing::info!("shutting down: no new heartbeats, committing the last batch");
        closing.cancel();
        ingest_stop.cancel();
        settle(http_task).await;
        settle(subscriber_task).await;
        settle(checker_task).await;
        // Both queue senders are gone now: the handler drains what is queued and stops.
        let unsaved = if handler_task.is_finished() {
            None
        } else {
            match handler_task.await {
                Ok(Ok(())) => None,
                Ok(Err(unsaved)) => Some(unsaved),
                Err(e) => {
                    tracing::error!(error = %e, "heartbeat handler failed during shutdown");
                    None
                }
            }
        };
        publish_stop.cancel();
        let publisher_deadline = DRAIN_TIMEOUT + Duration::from_secs(1);
        // The publisher and the sinks stop together (the sinks' queues are durable:
        // what they do not deliver now, they deliver at the next start).
        if tokio::time::timeout(publisher_deadline, settle(publisher_task))
            .await
            .is_err()
        {
            tracing::warn!("status publisher and notification sinks did not stop in time");
        }
        tracing::info!("fleetwatch stopped");
        match (failed, unsaved) {
            (_, Some(unsaved)) => Err(unsaved.into()),
            (Some(task), None) => Err(RunError::Failed(task)),
            (None, None) => Ok(()),
        }
    }
}

/// Wakes `wake` and the sinks whenever any hub sharing the database commits events,
/// until the returned handle is dropped.
fn hear_commits(
    leadership: Arc<dyn Leadership>,
    wake: Vec<Arc<tokio::sync::Notify>>,
    sinks: Arc<Sinks>,
) -> AbortOnDropHandle<()> {
    let heard = Arc::new(tokio::sync::Notify::new());
    AbortOnDropHandle::new(tokio::spawn(async move {
        let listening = leadership.listen(Arc::clone(&heard));
        let forwarding = async {
            loop {
                heard.notified().await;
                for wake in &wake {
                    wake.notify_one();
                }
                sinks.wake();
            }
        };
        tokio::join!(listening, forwarding);
    }))
}

/// What sends the outbox on: the status publisher and the notification sinks, run
/// while this hub leads (always, on a database only it uses).
struct Outbox {
    leadership: Arc<dyn Leadership>,
    endpoint: Endpoint,
    store: Arc<dyn Store>,
    wake: Arc<tokio::sync::Notify>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    clock: Clock,
    sinks: Arc<Sinks>,
}

impl Outbox {
    /// Leads when it can, sends while it leads, until `stop`. Returns before `stop`
    /// only if the publisher failed on its own.
    async fn run(self, stop: CancellationToken) {
        let mut led = false;
        while let Some(term) = self.leadership.acquire(&stop).await {
            if led {
                tracing::info!(
                    "this hub leads again: it publishes status events and sends notifications"
                );
            } else {
                tracing::info!("this hub publishes status events and sends notifications");
            }
            led = true;
            let sending = stop.child_token();
            let publisher = Publisher::new(
                self.endpoint.clone(),
                Arc::clone(&self.store),
                Arc::clone(&self.wake),
                Arc::clone(&self.metrics),
                Arc::clone(&self.health),
                self.clock.clone(),
            );
            let mut publisher = tokio::spawn(publisher.run(sending.clone()));
            let sinks = tokio::spawn(Arc::clone(&self.sinks).run(sending.clone()));
            let failed = tokio::select! {
                () = term.lost.cancelled() => false,
                () = stop.cancelled() => false,
                _ = &mut publisher => !sending.is_cancelled(),
            };
            sending.cancel();
            settle(publisher).await;
            settle(sinks).await;
            // Given up only now, so the next leader starts after this one stopped.
            drop(term);
            if failed {
                return;
            }
            if stop.is_cancelled() {
                break;
            }
            tracing::warn!(
                "this hub no longer leads; another hub sends status events and notifications"
            );
        }
    }
}

/// Says how the open-file limit is shared, and warns when it is too low for the
/// configured HTTP cap or leaves the embedded broker little room for devices.
fn report_budget(files: &Budget) {
    if let Some(configured) = files.lowered_from {
        tracing::warn!(
            open_file_limit = files.limit,
            http_max_connections = files.http_connections,
            configured,
            "the open-file limit has no room for http.max_connections; it is lowered so HTTP clients \
             cannot starve the database and the broker (raise the limit: ulimit -n, LimitNOFILE=)"
        );
    }
    match files.devices {
        Some(devices) if devices < 10_000 => tracing::warn!(
            open_file_limit = files.limit,
            device_connections = devices,
            "the open-file limit leaves the embedded broker room for few device connections \
             (raise it: ulimit -n, LimitNOFILE=)"
        ),
        _ => tracing::info!(
            open_file_limit = files.limit,
            http_max_connections = files.http_connections,
            "open-file limit"
        ),
    }
}

/// Waits for a task that may already have finished (its handle polled to completion).
async fn settle(task: JoinHandle<()>) {
    if !task.is_finished()
        && let Err(e) = task.await
    {
        tracing::error!(error = %e, "task failed during shutdown");
    }
}
