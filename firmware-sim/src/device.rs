//! One simulated device on its own connection, controllable from a test.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use rumqttc::{AsyncClient, QoS};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{self, Instant, MissedTickBehavior};

use crate::connection::{self, ConnectionSpec};
use crate::{BrokerUrl, SimError, heartbeat_declaring};

#[derive(Clone, Debug)]
pub struct DeviceConfig {
    pub url: BrokerUrl,
    pub id: String,
    /// Time between heartbeats.
    pub interval: Duration,
    pub qos: QoS,
    /// Leave a Last Will on `devices/{id}/lwt`.
    pub lwt: bool,
    /// MQTT keep-alive: the broker declares the device gone after 1.5 times this.
    pub keep_alive: Duration,
    /// How long `start` waits for the first connection.
    pub connect_timeout: Duration,
    /// Say `interval` in every heartbeat, so the hub knows when a beat is missed.
    pub declare_interval: bool,
    /// Labels every heartbeat declares, `(key, value)`.
    pub labels: Vec<(String, String)>,
    /// The device every heartbeat names as its `parent` (a gateway's id).
    pub parent: Option<String>,
}

impl DeviceConfig {
    pub fn new(url: BrokerUrl, id: impl Into<String>) -> Self {
        Self {
            url,
            id: id.into(),
            interval: Duration::from_secs(1),
            qos: QoS::AtLeastOnce,
            lwt: true,
            keep_alive: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            declare_interval: false,
            labels: Vec::new(),
            parent: None,
        }
    }

    /// Names `id` (a gateway) as the device's `parent` in every heartbeat.
    pub fn parent(mut self, id: impl Into<String>) -> Self {
        self.parent = Some(id.into());
        self
    }

    /// Declares `key: value` in every heartbeat (adds to any given before).
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.push((key.into(), value.into()));
        self
    }

    pub fn declare_interval(mut self, declare: bool) -> Self {
        self.declare_interval = declare;
        self
    }

    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    pub fn qos(mut self, qos: QoS) -> Self {
        self.qos = qos;
        self
    }

    pub fn lwt(mut self, lwt: bool) -> Self {
        self.lwt = lwt;
        self
    }
}

enum Command {
    Silence,
    Resume,
    Health(Option<String>),
    BeatNow(oneshot::Sender<Result<(), SimError>>),
}

/// A running simulated device. Dropping it stops it abruptly (like `cut_connection`).
pub struct SimDevice {
    id: String,
    commands: mpsc::Sender<Command>,
    connected: watch::Receiver<bool>,
    sent: Arc<AtomicU64>,
    client: AsyncClient,
    /// The heartbeat task and the network task; `None` once stopped.
    tasks: Option<[JoinHandle<()>; 2]>,
}

impl SimDevice {
    /// Connects, then publishes a first heartbeat at once and one every interval.
    pub async fn start(config: DeviceConfig) -> Result<Self, SimError> {
        let connection::Connected {
            client,
            connected,
            network,
        } = connection::connect(
            ConnectionSpec {
                url: &config.url,
                client_id: config.id.clone(),
                will_for: config.lwt.then_some(config.id.as_str()),
                keep_alive: config.keep_alive,
                inflight: 100,
                capacity: 64,
            },
            config.connect_timeout,
        )
        .await?;
        let (commands, inbox) = mpsc::channel(16);
        let sent = Arc::new(AtomicU64::new(0));
        let beats = tokio::spawn(
            Beater {
                client: client.clone(),
                config: config.clone(),
                sent: Arc::clone(&sent),
                started: Instant::now(),
                error: None,
            }
            .run(inbox),
        );
        Ok(Self {
            id: config.id,
            commands,
            connected,
            sent,
            client,
            tasks: Some([beats, network]),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Heartbeats published so far.
    pub fn heartbeats_sent(&self) -> u64 {
        self.sent.load(Relaxed)
    }

    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Stops heartbeats but keeps the connection open, so no Will fires: a device whose
    /// application hung while its network stack lives on.
    pub async fn silence(&self) -> Result<(), SimError> {
        self.send(Command::Silence).await
    }

    /// Publishes a heartbeat now and every interval again.
    pub async fn resume(&self) -> Result<(), SimError> {
        self.send(Command::Resume).await
    }

    /// From now on heartbeats say `"status":"error"` with this text; one goes out now.
    pub async fn report_error(&self, message: impl Into<String>) -> Result<(), SimError> {
        self.send(Command::Health(Some(message.into()))).await
    }

    /// From now on heartbeats say `"status":"ok"`; one goes out now.
    pub async fn report_ok(&self) -> Result<(), SimError> {
        self.send(Command::Health(None)).await
    }

    /// Publishes one heartbeat now and waits until the client has queued it.
    pub async fn beat(&self) -> Result<(), SimError> {
        let (reply, done) = oneshot::channel();
        self.send(Command::BeatNow(reply)).await?;
        done.await.map_err(|_| SimError::Stopped)?
    }

    /// Drops the connection without a DISCONNECT, as a crash or a pulled cable would:
    /// the broker publishes the device's Will.
    pub async fn cut_connection(mut self) {
        self.abort().await;
    }

    /// Disconnects cleanly: the broker discards the Will.
    pub async fn stop(mut self) {
        if let Some([beats, _]) = &self.tasks {
            beats.abort();
        }
        let _ = self.client.disconnect().await;
        // Let the event loop write the DISCONNECT before the socket goes.
        let mut connected = self.connected.clone();
        let _ = time::timeout(Duration::from_secs(2), connected.wait_for(|up| !*up)).await;
        self.abort().await;
    }

    /// Aborts both tasks and waits for them, so the socket is closed on return.
    async fn abort(&mut self) {
        if let Some(tasks) = self.tasks.take() {
            for task in tasks {
                task.abort();
                let _ = task.await;
            }
        }
    }

    async fn send(&self, command: Command) -> Result<(), SimError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| SimError::Stopped)
    }
}

impl Drop for SimDevice {
    fn drop(&mut self) {
        for task in self.tasks.iter().flatten() {
            task.abort();
        }
    }
}

struct Beater {
    client: AsyncClient,
    config: DeviceConfig,
    sent: Arc<AtomicU64>,
    started: Instant,
    error: Option<String>,
}

impl Beater {
    async fn run(mut self, mut inbox: mpsc::Receiver<Command>) {
        let mut ticker = time::interval(self.config.interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut beating = true;
        loop {
            tokio::select! {
                _ = ticker.tick(), if beating => {
                    let _ = self.beat().await;
                }
                command = inbox.recv() => match command {
                    None => return,
                    Some(Command::Silence) => beating = false,
                    Some(Command::Resume) => {
                        beating = true;
                        ticker.reset_immediately();
                    }
                    Some(Command::Health(error)) => {
                        self.error = error;
                        if beating {
                            ticker.reset_immediately();
                        }
                    }
                    Some(Command::BeatNow(reply)) => {
                        let _ = reply.send(self.beat().await);
                    }
                },
            }
        }
    }

    async fn beat(&mut self) -> Result<(), SimError> {
        let payload = heartbeat_declaring(
            &self.config.id,
            self.started.elapsed().as_secs(),
            self.error.as_deref(),
            self.config.declare_interval.then_some(self.config.interval),
            &self.config.labels,
            self.config.parent.as_deref(),
        );
        let topic = format!("devices/{}/heartbeat", self.config.id);
        self.client
            .publish(topic, self.config.qos, false, payload)
            .await?;
        self.sent.fetch_add(1, Relaxed);
        Ok(())
    }
}
