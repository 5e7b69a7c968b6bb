//! Test harness: a real hub on a real broker and a fresh database (see database.rs),
//! devices from firmware-sim, and an operator's view of `devices/+/status`.

use std::collections::HashMap;
use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use firmware_sim::{BrokerUrl, DeviceConfig, RawPublisher, SimDevice};
use fleetwatch::app::{Application, StartError};
use fleetwatch::config::{BrokerMode, Settings};
use fleetwatch::event::StatusEvent;
use fleetwatch::metrics::Metrics;
use fleetwatch::mqtt::broker::BrokerError;
use fleetwatch::status::Status;
use fleetwatch::storage::Store;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{self, Instant};

pub use crate::database::{Database, TestDatabase};

/// Default wait for something that should happen.
pub const PATIENCE: Duration = Duration::from_secs(15);

/// Held by the tests that load the machine most (hundreds of devices, several hub
/// processes) and by those with a bound on how long something may take under load
/// (a shutdown's drain window): they never run beside each other, on two cores.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub async fn heavy() -> tokio::sync::MutexGuard<'static, ()> {
    HEAVY.lock().await
}
/// `heartbeat.offline_after` in tests.
pub const OFFLINE_AFTER: Duration = Duration::from_secs(2);

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Logs to the test output when TEST_LOG is set.
pub fn init_logging() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_env("TEST_LOG"))
            .with_test_writer()
            .try_init();
    }
}

/// Which broker a hub under test uses.
#[derive(Clone, Debug)]
pub enum Broker {
    Embedded,
    /// An already running broker, e.g. a Mosquitto the test started.
    External(BrokerUrl),
}

/// What a hub under test runs on. A bare [`Broker`] means a fresh SQLite file.
#[derive(Clone, Debug)]
pub struct Setup {
    pub broker: Broker,
    pub database: Database,
}

impl From<Broker> for Setup {
    fn from(broker: Broker) -> Self {
        Self {
            broker,
            database: Database::Sqlite,
        }
    }
}

/// Settings for a hub under test: short offline_after, fast checks, the database `db`.
pub fn test_settings(broker: &Broker, db: &TestDatabase) -> Settings {
    test_settings_on(broker, db.url())
}

/// As [`test_settings`], on the database `url` names.
pub fn test_settings_on(broker: &Broker, url: String) -> Settings {
    let mut settings = Settings::default();
    settings.database.url = url;
    settings.heartbeat.offline_after = OFFLINE_AFTER;
    settings.heartbeat.check_interval = Duration::from_millis(100);
    settings.heartbeat.flush_interval = Duration::from_millis(50);
    settings.http.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    // Each transition its own message, at once: the tests of grouping turn it on.
    settings.notify.group_threshold = 0;
    settings.notify.group_wait = Duration::ZERO;
    match broker {
        Broker::Embedded => {
            settings.mqtt.broker = BrokerMode::Embedded;
            settings.mqtt.listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        }
        Broker::External(url) => {
            settings.mqtt.broker = BrokerMode::External;
            settings.mqtt.url = url.to_string();
        }
    }
    settings
}

pub struct TestApp {
    pub url: BrokerUrl,
    /// Base URL of the hub's HTTP server, e.g. `http://127.0.0.1:41234`.
    pub http: String,
    /// The API key the hub was configured with, if any.
    pub api_key: Option<String>,
    pub metrics: Arc<Metrics>,
    pub store: Arc<dyn Store>,
    /// Since when the hub has been subscribed (`None` while its connection is down).
    pub listening: fleetwatch::checker::Listening,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    database: Arc<TestDatabase>,
}

/// Starts a hub on a fresh database of the setup's kind and on its broker, with the
/// test settings changed by `tweak`, and returns once it is subscribed.
pub async fn spawn_app_with(setup: impl Into<Setup>, tweak: impl FnOnce(&mut Settings)) -> TestApp {
    let setup = setup.into();
    let database = TestDatabase::create(setup.database).await;
    let mut settings = test_settings(&setup.broker, &database);
    tweak(&mut settings);
    start(settings, database).await
}

pub async fn spawn_app(setup: impl Into<Setup>) -> TestApp {
    spawn_app_with(setup, |_| {}).await
}

/// Starts a hub with exactly these settings, which name `database`; the database
/// lives at least as long as the hub (share it to restart a hub on it).
pub async fn start(mut settings: Settings, database: impl Into<Arc<TestDatabase>>) -> TestApp {
    init_logging();
    let database = database.into();
    let external =
        matches!(settings.mqtt.broker, BrokerMode::External).then(|| settings.mqtt.url.clone());
    let api_key = settings
        .http
        .api_key
        .as_ref()
        .map(|k| k.expose().to_string());
    // The embedded broker's port was free when picked, but another test's outgoing
    // connection may have taken it since (both come from the ephemeral range): pick
    // another rather than fail a test that is not about ports.
    let mut attempts = 0;
    let app = loop {
        match Application::build(settings.clone()).await {
            Err(StartError::Broker(BrokerError::PortInUse(taken))) if attempts < 5 => {
                attempts += 1;
                settings.mqtt.listen = SocketAddr::new(taken.ip(), free_port());
            }
            built => break built.expect("hub starts"),
        }
    };
    let http = format!("http://{}", app.http_addr().expect("HTTP listener"));
    let url = match (app.embedded_broker(), external) {
        (Some(addr), _) => BrokerUrl::new(addr.ip().to_string(), addr.port()),
        (None, Some(url)) => url.parse().expect("external url"),
        (None, None) => unreachable!("a hub has a broker"),
    };
    let metrics = app.metrics();
    let store = app.store();
    let mut listening = app.listening();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        app.run_until_stopped(async {
            let _ = stopped.await;
        })
        .await
        .expect("hub runs and stops cleanly");
    });
    within(
        PATIENCE,
        "the hub to subscribe",
        listening.wait_for(|since| since.is_some()),
    )
    .await
    .expect("listening watch alive");
    TestApp {
        url,
        http,
        api_key,
        metrics,
        store,
        listening,
        stop: Some(stop),
        task: Some(task),
        database,
    }
}

impl TestApp {
    /// The hub's SQLite file, for the tests that reach into SQLite itself.
    pub fn db_path(&self) -> &std::path::Path {
        self.database
            .sqlite_path()
            .expect("a hub on SQLite (this test reaches into the file)")
    }

    /// A simulated device heartbeating every `interval`.
    pub async fn device(&self, id: &str, interval: Duration) -> SimDevice {
        sim_device(&self.url, id, interval).await
    }

    pub async fn watch(&self) -> StatusWatcher {
        StatusWatcher::connect(&self.url).await
    }

    pub async fn raw(&self, name: &str) -> RawPublisher {
        RawPublisher::connect(&self.url, name)
            .await
            .expect("raw publisher connects")
    }

    /// Shuts the hub down the way SIGTERM does and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            within(PATIENCE, "the hub to stop", task)
                .await
                .expect("hub task");
        }
    }

    /// A request to the hub's HTTP server, with the API key if one is configured.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = reqwest::Client::new().request(method, format!("{}{path}", self.http));
        match &self.api_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    /// The device as stored, if it exists.
    /// Sends a request without a body (with the key, if any).
    pub async fn send(&self, method: reqwest::Method, path: &str) -> reqwest::Response {
        self.request(method, path).send().await.expect("request")
    }

    /// GETs `path` and reads its JSON body.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        self.send(reqwest::Method::GET, path)
            .await
            .json()
            .await
            .expect("a JSON body")
    }

    pub async fn stored(&self, id: &str) -> Option<fleetwatch::storage::Device> {
        let id = id.parse().expect("valid id");
        self.store.device(&id).await.expect("store readable")
    }

    pub async fn status_of(&self, id: &str) -> Option<Status> {
        self.stored(id).await.map(|d| d.status)
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Awaits `future`, failing the test with `what` if it takes longer than `limit`.
/// A simulated device on `url`, heartbeating every `interval`.
pub async fn sim_device(url: &BrokerUrl, id: &str, interval: Duration) -> SimDevice {
    let config = DeviceConfig::new(url.clone(), id).interval(interval);
    SimDevice::start(config).await.expect("device connects")
}

pub async fn within<F: Future>(limit: Duration, what: &str, future: F) -> F::Output {
    match time::timeout(limit, future).await {
        Ok(output) => output,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// Polls `check` until it returns true, failing after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        time::sleep(Duration::from_millis(20)).await;
    }
}

/// A status event as an operator's client received it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub event: StatusEvent,
    /// Delivered from the broker's retained store on subscribe.
    pub retained: bool,
}

/// An operator subscribed to `devices/+/status` (QoS 0, like `mosquitto_sub`, which
/// also lets rumqttd deliver every retained status on subscribe).
pub struct StatusWatcher {
    inbox: mpsc::Receiver<Seen>,
    /// Everything received, in order.
    pub history: Vec<Seen>,
    /// Per device, how many of its events `next` has handed out.
    cursors: HashMap<String, usize>,
    task: JoinHandle<()>,
}

impl StatusWatcher {
    pub async fn connect(url: &BrokerUrl) -> Self {
        let client_id = format!("watcher-{}", uuid::Uuid::now_v7().simple());
        let mut options = MqttOptions::new(client_id, url.host.clone(), url.port);
        options.set_max_packet_size(1024 * 1024, 1024 * 1024);
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        let (events, inbox) = mpsc::channel(100_000);
        let (subscribed, ready) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut subscribed = Some(subscribed);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.try_subscribe("devices/+/status", QoS::AtMostOnce);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = subscribed.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        let event: StatusEvent = serde_json::from_slice(&publish.payload)
                            .unwrap_or_else(|e| panic!("status payload is not an event: {e}"));
                        assert_eq!(publish.topic, format!("devices/{}/status", event.device_id));
                        if events
                            .send(Seen {
                                event,
                                retained: publish.retain,
                            })
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        within(PATIENCE, "the watcher to subscribe", ready)
            .await
            .expect("watcher task alive");
        Self {
            inbox,
            history: Vec::new(),
            cursors: HashMap::new(),
            task,
        }
    }

    fn events_of(&self, device: &str) -> impl Iterator<Item = &Seen> {
        self.history
            .iter()
            .filter(move |seen| seen.event.device_id.as_str() == device)
    }

    /// The next event of `device` not handed out before, waiting up to `limit`.
    pub async fn next(&mut self, device: &str, limit: Duration) -> Seen {
        let deadline = Instant::now() + limit;
        loop {
            let cursor = self.cursors.get(device).copied().unwrap_or(0);
            let found = self.events_of(device).nth(cursor).cloned();
            if let Some(seen) = found {
                self.cursors.insert(device.to_string(), cursor + 1);
                return seen;
            }
            match time::timeout_at(deadline, self.inbox.recv()).await {
                Ok(Some(seen)) => self.history.push(seen),
                Ok(None) => panic!("watcher stopped"),
                Err(_) => panic!(
                    "no further status event for {device} within {limit:?}; history: {:#?}",
                    self.history
                ),
            }
        }
    }

    /// The next event of `device`, which must have this status and reason.
    pub async fn expect(&mut self, device: &str, status: Status, reason: &str) -> StatusEvent {
        let seen = self.next(device, PATIENCE).await;
        assert_eq!(
            (seen.event.status, seen.event.reason.as_str()),
            (status, reason),
            "unexpected event for {device}: {:?}",
            seen.event
        );
        seen.event
    }

    /// Collects everything that arrives within `window`. Negative assertions need a
    /// window: "nothing happened" can only be observed for a while.
    pub async fn collect_for(&mut self, window: Duration) {
        let deadline = Instant::now() + window;
        while let Ok(Some(seen)) = time::timeout_at(deadline, self.inbox.recv()).await {
            self.history.push(seen);
        }
    }

    /// Events of `device` not yet handed out by `next`.
    pub fn unread(&self, device: &str) -> Vec<StatusEvent> {
        let cursor = self.cursors.get(device).copied().unwrap_or(0);
        self.events_of(device)
            .skip(cursor)
            .map(|s| s.event.clone())
            .collect()
    }

    /// Waits until `count` events of `status` have arrived in total.
    pub async fn wait_for_count(&mut self, status: Status, count: usize, limit: Duration) {
        self.wait_until(status, count, limit, |history| {
            history.iter().filter(|s| s.event.status == status).count()
        })
        .await;
    }

    #[cfg_attr(not(feature = "mosquitto-tests"), allow(dead_code))]
    /// Waits until `count` different devices have had an event of `status`
    /// (re-deliveries of one device's event count once).
    pub async fn wait_for_devices(&mut self, status: Status, count: usize, limit: Duration) {
        self.wait_until(status, count, limit, |history| {
            history
                .iter()
                .filter(|s| s.event.status == status)
                .map(|s| s.event.device_id.as_str())
                .collect::<std::collections::HashSet<_>>()
                .len()
        })
        .await;
    }

    async fn wait_until(
        &mut self,
        status: Status,
        count: usize,
        limit: Duration,
        counted: impl Fn(&[Seen]) -> usize,
    ) {
        let deadline = Instant::now() + limit;
        while counted(&self.history) < count {
            match time::timeout_at(deadline, self.inbox.recv()).await {
                Ok(Some(seen)) => self.history.push(seen),
                Ok(None) => panic!("watcher stopped"),
                Err(_) => panic!(
                    "only {} of {count} {status} within {limit:?}",
                    counted(&self.history)
                ),
            }
        }
    }
}

impl Drop for StatusWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}
