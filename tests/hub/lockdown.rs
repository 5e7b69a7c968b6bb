//! The locked-down Mosquitto of mosquitto/secure/: logins, the ACL and TLS. Each test
//! starts its own Mosquitto on a free port with the shipped mosquitto.conf and acl (only
//! paths and the port changed), and files made by the shipped setup.sh: a fresh test CA,
//! a server certificate for 127.0.0.1, and a password file.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use firmware_sim::{BrokerUrl, DeviceConfig, RawPublisher, SimDevice};
use fleetwatch::app::Application;
use fleetwatch::config::Settings;
use fleetwatch::status::Status;
use rumqttc::{
    AsyncClient, ConnAck, ConnectReturnCode, ConnectionError, Event, LastWill, MqttOptions, Packet,
    Publish, QoS,
};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::helpers::{
    Broker, PATIENCE, TestApp, eventually, free_port, spawn_app_with, test_settings_on, within,
};

/// The hub's login in mosquitto/secure/acl.
const HUB: &str = "fleetwatch-hub";
/// The operators' login there.
const OPERATOR: &str = "operator";
/// "Nothing happened" can only be watched for a while.
const QUIET: Duration = Duration::from_secs(1);

fn setup_sh() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("mosquitto/secure/setup.sh")
}

/// Runs mosquitto/secure/setup.sh with `args`.
fn setup(args: &[&str]) {
    let output = Command::new("sh")
        .arg(setup_sh())
        .args(args)
        .output()
        .expect("sh runs setup.sh");
    assert!(
        output.status.success(),
        "setup.sh {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Each login's password in these tests.
fn password(user: &str) -> String {
    format!("{user}-secret")
}

pub struct SecureMosquitto {
    child: Child,
    pub port: u16,
    /// The test CA that signed the broker's certificate.
    pub ca: PathBuf,
    dir: tempfile::TempDir,
}

impl SecureMosquitto {
    /// Starts a locked-down Mosquitto that knows `users` (with [`password`]).
    pub fn start(users: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let certs = root.join("certs");
        setup(&["certs", certs.to_str().expect("utf-8 path"), "127.0.0.1"]);
        let passwd = root.join("passwd");
        for user in users {
            setup(&[
                "user",
                passwd.to_str().expect("utf-8 path"),
                user,
                &password(user),
            ]);
        }
        std::fs::write(root.join("acl"), include_str!("../../mosquitto/secure/acl"))
            .expect("write acl");
        std::fs::create_dir_all(root.join("data")).expect("data dir");
        let port = free_port();
        let conf = root.join("mosquitto.conf");
        std::fs::write(&conf, secure_config(port, root)).expect("write mosquitto.conf");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the mosquitto-tests feature needs `mosquitto` on PATH");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "mosquitto did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            port,
            ca: certs.join("ca.crt"),
            dir,
        }
    }

    /// `mqtts://` to this broker as `user`, trusting the test CA.
    pub fn url(&self, user: &str) -> BrokerUrl {
        self.url_with_password(user, &password(user))
    }

    pub fn url_with_password(&self, user: &str, password: &str) -> BrokerUrl {
        BrokerUrl::new("127.0.0.1", self.port)
            .with_login(user, password)
            .with_ca_file(&self.ca)
            .expect("the test CA loads")
    }

    /// Hub settings for this broker: TLS with the test CA, logged in as the hub.
    pub fn hub_settings(&self, settings: &mut Settings) {
        settings.mqtt.url = format!("mqtts://127.0.0.1:{}", self.port);
        settings.mqtt.username = Some(HUB.into());
        settings.mqtt.password = Some(fleetwatch::config::Secret::new(password(HUB)));
        settings.mqtt.ca_file = Some(self.ca.clone());
    }

    /// A directory that lives as long as the broker.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SecureMosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// mosquitto/secure/mosquitto.conf with its files in `dir` and its listener on
/// `port` on loopback.
fn secure_config(port: u16, dir: &Path) -> String {
    let shipped = include_str!("../../mosquitto/secure/mosquitto.conf");
    let mut lines: Vec<String> = shipped
        .lines()
        .map(|line| match line.split_whitespace().next() {
            Some("listener") => format!("listener {port} 127.0.0.1"),
            Some("log_dest") => "log_dest stderr".into(),
            _ => line
                .replace("/mosquitto/config/", &format!("{}/", dir.display()))
                .replace("/mosquitto/data/", &format!("{}/data/", dir.display())),
        })
        .collect();
    // Run as root (CI), Mosquitto would drop to user `mosquitto` before reading the
    // password file in the test's private directory. `user root` keeps it; it has no
    // effect for anyone else.
    lines.push("user root".into());
    lines.join("\n")
}

/// A hub on the secure broker, logged in over TLS, subscribed.
async fn secure_hub(mosquitto: &SecureMosquitto) -> TestApp {
    let broker = Broker::External(BrokerUrl::new("127.0.0.1", mosquitto.port));
    spawn_app_with(broker, |settings| mosquitto.hub_settings(settings)).await
}

/// The broker's first answer to a connection: its CONNACK, or the error.
async fn first_answer(options: MqttOptions) -> Result<ConnAck, ConnectionError> {
    let (_client, mut eventloop) = AsyncClient::new(options, 10);
    within(PATIENCE, "the broker's answer", async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => return Ok(ack),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await
}

fn refused(answer: &Result<ConnAck, ConnectionError>) -> bool {
    matches!(
        answer,
        Err(ConnectionError::ConnectionRefused(
            ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadUserNamePassword
        ))
    )
}

/// A client that records every message on its subscriptions.
struct Spy {
    inbox: mpsc::UnboundedReceiver<Publish>,
    task: JoinHandle<()>,
}

impl Spy {
    async fn connect(url: &BrokerUrl, filters: &[&str]) -> Self {
        let client_id = format!("spy-{}", uuid::Uuid::now_v7().simple());
        let (client, mut eventloop) = AsyncClient::new(url.mqtt_options(client_id), 16);
        let (tx, inbox) = mpsc::unbounded_channel();
        let (subscribed, ready) = oneshot::channel();
        let filters: Vec<String> = filters.iter().map(|f| f.to_string()).collect();
        let task = tokio::spawn(async move {
            let mut subscribed = Some(subscribed);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        for filter in &filters {
                            let _ = client.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = subscribed.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        let _ = tx.send(publish);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        within(PATIENCE, "the spy to subscribe", ready)
            .await
            .expect("spy task alive");
        Self { inbox, task }
    }

    /// Everything received so far.
    fn drain(&mut self) -> Vec<Publish> {
        std::iter::from_fn(|| self.inbox.try_recv().ok()).collect()
    }

    /// The next message, waiting up to `PATIENCE`.
    async fn next(&mut self) -> Publish {
        within(PATIENCE, "a message", self.inbox.recv())
            .await
            .expect("spy task alive")
    }
}

impl Drop for Spy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The next status an operator reads for `device`, skipping other devices'.
async fn next_status(operator: &mut Spy, device: &str) -> serde_json::Value {
    loop {
        let publish = operator.next().await;
        if publish.topic == format!("devices/{device}/status") {
            return serde_json::from_slice(&publish.payload).expect("a status event");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_logs_in_over_tls_hears_devices_and_publishes_statuses() {
    let mosquitto = SecureMosquitto::start(&[HUB, OPERATOR, "pump-1"]);
    // Returns once the hub is subscribed: its login, TLS and the ACL's read rules work.
    let app = secure_hub(&mosquitto).await;
    let mut operator = Spy::connect(&mosquitto.url(OPERATOR), &["devices/+/status"]).await;

    let device = SimDevice::start(
        DeviceConfig::new(mosquitto.url("pump-1"), "pump-1").interval(Duration::from_secs(3600)),
    )
    .await
    .expect("a device with its login connects over TLS");
    let online = next_status(&mut operator, "pump-1").await;
    assert_eq!(
        (online["status"].as_str(), online["reason"].as_str()),
        (Some("online"), Some("registered"))
    );
    assert_eq!(app.status_of("pump-1").await, Some(Status::Online));

    // Its own Will is allowed.
    device.cut_connection().await;
    let offline = next_status(&mut operator, "pump-1").await;
    assert_eq!(
        (offline["status"].as_str(), offline["reason"].as_str()),
        (Some("offline"), Some("connection_lost"))
    );
    let (status, health) = health(&app).await;
    assert_eq!(status, 200, "{health}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_publishes_only_its_own_heartbeat_and_will() {
    let mosquitto = SecureMosquitto::start(&[HUB, OPERATOR, "dev-a", "dev-b"]);
    let app = secure_hub(&mosquitto).await;
    let mut operator = Spy::connect(&mosquitto.url(OPERATOR), &["devices/+/status"]).await;
    // Reads what the hub reads, as the hub's login: whatever reaches it reaches the hub.
    let mut spy = Spy::connect(
        &mosquitto.url(HUB),
        &["devices/dev-b/heartbeat", "devices/dev-b/lwt"],
    )
    .await;
    let _victim = SimDevice::start(
        DeviceConfig::new(mosquitto.url("dev-b"), "dev-b").interval(Duration::from_secs(3600)),
    )
    .await
    .expect("dev-b connects");
    assert_eq!(
        next_status(&mut operator, "dev-b").await["status"],
        "online"
    );
    assert_eq!(spy.next().await.topic, "devices/dev-b/heartbeat");
    let heartbeats = app.metrics.heartbeats_received.load(Relaxed);
    let wills = app.metrics.wills_received.load(Relaxed);

    // dev-a, logged in as itself, forges dev-b's heartbeat, Will and status (QoS 1:
    // Mosquitto acknowledges each, MQTT 3.1.1 has no way to say no, and drops it)...
    let forger = RawPublisher::connect(&mosquitto.url("dev-a"), "dev-a")
        .await
        .expect("dev-a connects");
    forger
        .publish(
            "devices/dev-b/heartbeat",
            r#"{"status":"error","error":"forged"}"#,
        )
        .await
        .expect("queued");
    forger
        .publish("devices/dev-b/lwt", "forged")
        .await
        .expect("queued");
    let forged_status = serde_json::json!({"event_id": "01a2076f-a4e8-77a7-8d14-7b8f257d509e",
        "device_id": "dev-b", "status": "offline", "previous_status": "online",
        "reason": "heartbeat_timeout", "last_seen_at": null,
        "changed_at": "2026-11-22T10:03:00.250Z"});
    forger
        .publish_with("devices/dev-b/status", forged_status.to_string(), true)
        .await
        .expect("queued");
    // ...and leaves a Will on dev-b's topic, then drops its connection.
    let mut options = mosquitto.url("dev-a").mqtt_options("dev-a-will");
    options.set_last_will(LastWill::new(
        "devices/dev-b/lwt",
        "forged",
        QoS::AtLeastOnce,
        false,
    ));
    let (will_client, mut will_loop) = AsyncClient::new(options, 10);
    within(PATIENCE, "the Will connection", async {
        loop {
            if let Event::Incoming(Packet::ConnAck(_)) = will_loop.poll().await.expect("connects") {
                break;
            }
        }
    })
    .await;
    drop((will_client, will_loop)); // the socket closes with no DISCONNECT: the Will fires

    // Its own heartbeat, after the forgeries on the same connection, goes through: once
    // the hub has it, anything let through before it would have arrived too.
    forger
        .publish("devices/dev-a/heartbeat", "{}")
        .await
        .expect("queued");
    eventually(PATIENCE, "dev-a's own heartbeat to register it", || async {
        app.status_of("dev-a").await == Some(Status::Online)
    })
    .await;
    tokio::time::sleep(QUIET).await;

    assert_eq!(
        spy.drain()
            .iter()
            .map(|p| p.topic.clone())
            .collect::<Vec<_>>(),
        Vec::<String>::new(),
        "Mosquitto passed on a forgery"
    );
    assert_eq!(app.status_of("dev-b").await, Some(Status::Online));
    let events = app.get_json("/api/v1/devices/dev-b/events").await;
    assert_eq!(
        events["events"].as_array().map(Vec::len),
        Some(1),
        "dev-b has only its registration: {events}"
    );
    assert_eq!(
        app.metrics.heartbeats_received.load(Relaxed),
        heartbeats + 1,
        "only dev-a's own heartbeat reached the hub"
    );
    assert_eq!(app.metrics.wills_received.load(Relaxed), wills);
    let statuses: Vec<_> = operator
        .drain()
        .into_iter()
        .filter(|p| p.topic == "devices/dev-b/status")
        .collect();
    assert!(
        statuses.is_empty(),
        "forged status reached operators: {statuses:?}"
    );
    // A late operator gets dev-b's retained status from the hub, not the forgery.
    let mut late = Spy::connect(&mosquitto.url(OPERATOR), &["devices/dev-b/status"]).await;
    let retained = late.next().await;
    let retained: serde_json::Value = serde_json::from_slice(&retained.payload).expect("event");
    assert_eq!(retained["status"], "online", "{retained}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_cannot_connect_and_the_hub_says_so() {
    let mosquitto = SecureMosquitto::start(&[HUB, "dev-a"]);
    let wrong = mosquitto.url_with_password("dev-a", "not-the-password");
    let answer = first_answer(wrong.mqtt_options("dev-a")).await;
    assert!(refused(&answer), "wrong password: {answer:?}");
    let mut anonymous = mosquitto.url("dev-a");
    anonymous.login = None;
    let answer = first_answer(anonymous.mqtt_options("anonymous")).await;
    assert!(refused(&answer), "no login: {answer:?}");
    let right = first_answer(mosquitto.url("dev-a").mqtt_options("dev-a")).await;
    assert!(right.is_ok(), "the right password: {right:?}");

    // The hub keeps trying, and /healthz says the broker part is down.
    let mut settings = hub_settings_for(&mosquitto);
    settings.mqtt.password = Some(fleetwatch::config::Secret::new("not-the-password"));
    let hub = RunningHub::start(settings).await;
    for _ in 0..3 {
        let (status, health) = hub.health().await;
        assert_eq!(status, 503, "{health}");
        assert_ne!(health["broker"], "ok", "{health}");
        assert_eq!(health["database"], "ok", "{health}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(hub.listening.borrow().is_none(), "never subscribed");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_only_a_client_trusting_the_ca_connects() {
    let mosquitto = SecureMosquitto::start(&[HUB, "dev-a"]);
    let with_ca = mosquitto.url("dev-a");
    // No TLS at all.
    let mut plain = with_ca.clone();
    plain.tls = None;
    let answer = first_answer(plain.mqtt_options("dev-a")).await;
    assert!(answer.is_err(), "plain MQTT to the TLS port: {answer:?}");
    // TLS trusting the public roots, not the broker's CA.
    let public: BrokerUrl = format!(
        "mqtts://dev-a:{}@127.0.0.1:{}",
        password("dev-a"),
        mosquitto.port
    )
    .parse()
    .expect("url");
    let answer = first_answer(public.mqtt_options("dev-a")).await;
    assert!(
        matches!(answer, Err(ConnectionError::Tls(_))),
        "without the CA: {answer:?}"
    );
    // TLS trusting another CA.
    let other = mosquitto.dir().join("other");
    setup(&["certs", other.to_str().expect("utf-8"), "127.0.0.1"]);
    let stranger = with_ca
        .clone()
        .with_ca_file(other.join("ca.crt"))
        .expect("CA");
    let answer = first_answer(stranger.mqtt_options("dev-a")).await;
    assert!(
        matches!(answer, Err(ConnectionError::Tls(_))),
        "another CA: {answer:?}"
    );
    assert!(first_answer(with_ca.mqtt_options("dev-a")).await.is_ok());

    // The hub without the CA file cannot subscribe...
    let mut settings = hub_settings_for(&mosquitto);
    settings.mqtt.ca_file = None;
    let hub = RunningHub::start(settings).await;
    tokio::time::sleep(QUIET).await;
    let (status, health) = hub.health().await;
    assert_eq!(status, 503, "{health}");
    assert!(
        hub.listening.borrow().is_none(),
        "subscribed without the CA"
    );
    hub.stop().await;
    // ...and with a CA file it cannot read, it does not start.
    let mut settings = hub_settings_for(&mosquitto);
    settings.mqtt.ca_file = Some(mosquitto.dir().join("missing.crt"));
    let error = Application::build(settings)
        .await
        .err()
        .expect("a missing CA file stops start-up")
        .to_string();
    assert!(error.contains("mqtt.ca_file"), "{error}");
    // With it, it does (as in the other tests).
    let app = secure_hub(&mosquitto).await;
    app.stop().await;
}

/// Settings for a hub on `mosquitto` with its database in the broker's directory.
fn hub_settings_for(mosquitto: &SecureMosquitto) -> Settings {
    let db = mosquitto
        .dir()
        .join(format!("hub-{}.db", uuid::Uuid::now_v7().simple()));
    let broker = Broker::External(BrokerUrl::new("127.0.0.1", mosquitto.port));
    let mut settings = test_settings_on(&broker, format!("sqlite://{}", db.display()));
    mosquitto.hub_settings(&mut settings);
    settings
}

/// A hub that may never manage to subscribe (the helpers' `start` waits until it has).
struct RunningHub {
    http: String,
    listening: fleetwatch::checker::Listening,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl RunningHub {
    async fn start(settings: Settings) -> Self {
        crate::helpers::init_logging();
        let app = Application::build(settings).await.expect("hub starts");
        let http = format!("http://{}", app.http_addr().expect("HTTP listener"));
        let listening = app.listening();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            app.run_until_stopped(async {
                let _ = stopped.await;
            })
            .await
            .expect("hub runs and stops cleanly");
        });
        Self {
            http,
            listening,
            stop,
            task,
        }
    }

    async fn health(&self) -> (u16, serde_json::Value) {
        get_health(&self.http).await
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        within(PATIENCE, "the hub to stop", self.task)
            .await
            .expect("hub task");
    }
}

async fn health(app: &TestApp) -> (u16, serde_json::Value) {
    get_health(&app.http).await
}

async fn get_health(base: &str) -> (u16, serde_json::Value) {
    let response = reqwest::get(format!("{base}/healthz"))
        .await
        .expect("/healthz answers");
    let status = response.status().as_u16();
    (status, response.json().await.expect("a JSON body"))
}
