//! The embedded broker: rumqttd in the hub's process, so one binary is enough.
//!
//! rumqttd has no way to report that its listener failed (it logs and its thread
//! ends) and no way to stop, so this module checks the port before starting it,
//! confirms it accepts connections after, and reports the broker's threads ending.
//!
//! Limits users should know (README "Choosing a broker"): rumqttd keeps nothing on
//! disk, so retained statuses are republished by the hub at start; it sends a QoS 1
//! subscriber at most 100 retained messages on subscribe (a QoS 0 subscriber gets up
//! to `MAX_RETAINED_ON_SUBSCRIBE`); each connection costs about 44 KB, so a large
//! fleet belongs on Mosquitto; and a client whose connection rumqttd refuses after
//! CONNECT (a client id with `+ $ # /`, or the connection limit) and that connects
//! again poisons a lock and stops the listener accepting anyone new
//! (bytebeamio/rumqtt#1062). [`EmbeddedBroker::supervise`] notices that with a real
//! MQTT round trip, so the hub can stop and be restarted rather than run deaf to
//! reconnecting devices. With `mqtt.require_login` only registered device ids get
//! past CONNECT ([`super::logins`]), which also keeps such client ids out; the login
//! check refuses before rumqttd's will bookkeeping, so a refused login is not a
//! refusal of that kind.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use rumqttc::MqttOptions;
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{self, Instant};

use super::logins::Logins;

/// Device connections the embedded broker admits. Far above what it can serve well
/// (Mosquitto is the answer there), because a refused connection that reconnects
/// triggers rumqttd#1062; the process's open-file limit is the practical cap.
const MAX_CONNECTIONS: usize = 100_000;
/// How often the supervisor checks that the broker accepts new connections.
const PROBE_INTERVAL: Duration = Duration::from_secs(3);
/// How long a probe waits for CONNACK: generous, because a reconnect storm of
/// thousands of devices can keep the broker's single accept loop busy for seconds.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Keep-alive of a probe's connection (it lasts one round trip).
pub const PROBE_KEEP_ALIVE: Duration = Duration::from_secs(5);
/// Consecutive failed probes before the broker is declared broken.
const PROBE_FAILURES: u32 = 5;
/// Messages a QoS 0 subscriber may receive per read, including retained messages
/// on subscribe.
const MAX_RETAINED_ON_SUBSCRIBE: u64 = 200_000;
/// rumqttd keeps each topic filter's recent messages in memory segments.
const SEGMENT_SIZE: usize = 8 * 1024 * 1024;
const SEGMENT_COUNT: usize = 4;
/// A client that connects but never sends CONNECT is dropped after this.
const CONNECT_TIMEOUT_MS: u16 = 10_000;

impl BrokerFailure {
    /// Names the likeliest cause of probes that keep failing: a process out of file
    /// descriptors fails them too, and rumqttd#1062 is only the other suspect.
    fn diagnose(probe: String) -> Self {
        if crate::open_files::nearly_exhausted() {
            BrokerFailure::OutOfFiles {
                probe,
                usage: crate::open_files::describe_usage(),
            }
        } else {
            BrokerFailure::Refusing(probe)
        }
    }
}

/// Why the embedded broker can no longer serve devices.
#[derive(Debug, thiserror::Error)]
pub enum BrokerFailure {
    #[error("the embedded MQTT broker's listener stopped")]
    Stopped,
    #[error(
        "the embedded MQTT broker no longer accepts new connections ({probe}): the process has \
         run out of file descriptors ({usage}). Raise the open-file limit (ulimit -n, LimitNOFILE=) \
         or move devices to Mosquitto (mqtt.broker = \"external\")"
    )]
    OutOfFiles { probe: String, usage: String },
    #[error(
        "the embedded MQTT broker no longer accepts new connections ({0}); a device probably \
         connected with a client id containing + $ # / (rumqttd defect bytebeamio/rumqtt#1062). \
         Restart the hub; for untrusted devices use Mosquitto (mqtt.broker = \"external\")"
    )]
    Refusing(String),
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(
        "mqtt.listen {0}: address already in use (is another MQTT broker, such as Mosquitto, running? \
         set FLEETWATCH_MQTT__LISTEN to a free address, or FLEETWATCH_MQTT__BROKER=external to use that broker)"
    )]
    PortInUse(SocketAddr),
    #[error("mqtt.listen {0}: cannot listen: {1}")]
    Listen(SocketAddr, io::Error),
    #[error("the embedded MQTT broker did not start listening on {0}")]
    NotListening(SocketAddr),
    #[error("could not start the embedded MQTT broker: {0}")]
    Start(String),
}

/// A running embedded broker.
#[derive(Debug)]
pub struct EmbeddedBroker {
    listen: SocketAddr,
    /// Resolves when rumqttd's `start` returns: every listener has died.
    stopped: tokio::sync::oneshot::Receiver<()>,
}

impl EmbeddedBroker {
    /// Starts rumqttd on `listen`, refusing packets larger than `max_packet` bytes
    /// (the sender is disconnected) and, with `logins`, any CONNECT they refuse; returns
    /// once it accepts connections.
    pub async fn start(
        listen: SocketAddr,
        max_packet: usize,
        logins: Option<Logins>,
    ) -> Result<Self, BrokerError> {
        ensure_free(listen)?;
        let mut broker = Broker::new(config(listen, max_packet, logins));
        let (report_stop, stopped) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("embedded-broker".into())
            .spawn(move || {
                // Returns only if every listener has died.
                if let Err(e) = broker.start() {
                    tracing::error!(%listen, error = %e, "the embedded MQTT broker failed");
                }
                let _ = report_stop.send(());
            })
            .map_err(|e| BrokerError::Start(e.to_string()))?;
        wait_until_listening(listen).await?;
        tracing::info!(%listen, "embedded MQTT broker listening");
        Ok(Self { listen, stopped })
    }

    /// Watches the broker until it fails: returns when its listener has died or it has
    /// refused [`PROBE_FAILURES`] MQTT connections in a row. Probes connect with
    /// `options`, always the same client id: rumqttd keeps a record of every client id
    /// it has seen, so fresh ids would leak memory.
    pub async fn supervise(self, options: MqttOptions) -> BrokerFailure {
        let Self { mut stopped, .. } = self;
        let mut failures = 0;
        let mut tick = time::interval(PROBE_INTERVAL);
        loop {
            tokio::select! {
                _ = &mut stopped => return BrokerFailure::Stopped,
                _ = tick.tick() => {}
            }
            match probe(options.clone()).await {
                Ok(()) => failures = 0,
                Err(why) => {
                    failures += 1;
                    tracing::warn!(error = %why, failures, "embedded MQTT broker probe failed");
                    if failures >= PROBE_FAILURES {
                        return BrokerFailure::diagnose(why);
                    }
                }
            }
        }
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// Where a client on this machine reaches the broker: the listen address, with
    /// an unspecified IP replaced by loopback.
    pub fn local_addr(&self) -> SocketAddr {
        local_addr(self.listen)
    }
}

pub fn local_addr(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// Binds and releases `listen` the way tokio (and so rumqttd) binds, to turn "port
/// taken" into a clear error instead of a broker thread dying in the background.
fn ensure_free(listen: SocketAddr) -> Result<(), BrokerError> {
    let socket = match listen {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| BrokerError::Listen(listen, e))?;
    socket
        .set_reuseaddr(true)
        .map_err(|e| BrokerError::Listen(listen, e))?;
    match socket.bind(listen) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(BrokerError::PortInUse(listen)),
        Err(e) => Err(BrokerError::Listen(listen, e)),
    }
}

/// One MQTT round trip through the broker's router: CONNECT, CONNACK, DISCONNECT,
/// as the hub's client `options` say (its address, client id and login).
pub async fn probe(options: MqttOptions) -> Result<(), String> {
    use rumqttc::{AsyncClient, ConnectReturnCode, Event, Packet};
    let (client, mut eventloop) = AsyncClient::new(options, 1);
    let connected = time::timeout(PROBE_TIMEOUT, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack)))
                    if ack.code == ConnectReturnCode::Success =>
                {
                    return Ok(());
                }
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    return Err(format!("CONNECT refused: {:?}", ack.code));
                }
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err(format!("no CONNACK within {PROBE_TIMEOUT:?}")));
    if connected.is_ok() {
        let _ = client.try_disconnect();
        let _ = time::timeout(Duration::from_millis(200), eventloop.poll()).await;
    }
    connected
}

async fn wait_until_listening(listen: SocketAddr) -> Result<(), BrokerError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let target = local_addr(listen);
    while Instant::now() < deadline {
        if TcpStream::connect(target).await.is_ok() {
            return Ok(());
        }
        time::sleep(Duration::from_millis(20)).await;
    }
    Err(BrokerError::NotListening(listen))
}

fn config(listen: SocketAddr, max_packet: usize, logins: Option<Logins>) -> Config {
    let mut server = ServerSettings {
        name: "devices".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: CONNECT_TIMEOUT_MS,
            max_payload_size: max_packet,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    if let Some(logins) = logins {
        server.set_auth_handler(move |client_id, username, password| {
            logins.clone().check(client_id, username, password)
        });
    }
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: MAX_CONNECTIONS,
            max_outgoing_packet_count: MAX_RETAINED_ON_SUBSCRIBE,
            max_segment_size: SEGMENT_SIZE.max(max_packet * 4),
            max_segment_count: SEGMENT_COUNT,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([("devices".to_string(), server)])),
        ..Config::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_taken_port_is_reported_in_one_plain_line() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("addr");
        let error = EmbeddedBroker::start(addr, 1024, None)
            .await
            .expect_err("port is taken");
        assert!(
            matches!(error, BrokerError::PortInUse(a) if a == addr),
            "{error:?}"
        );
        let line = error.to_string();
        assert!(
            line.contains("mqtt.listen") && line.contains("already in use"),
            "{line}"
        );
        assert!(!line.contains('\n'));
    }

    #[test]
    fn unspecified_listen_addresses_are_reached_on_loopback() {
        let any: SocketAddr = "0.0.0.0:1883".parse().expect("addr");
        assert_eq!(local_addr(any).to_string(), "127.0.0.1:1883");
        let v6: SocketAddr = "[::]:1883".parse().expect("addr");
        assert_eq!(local_addr(v6).to_string(), "[::1]:1883");
        let specific: SocketAddr = "10.0.0.5:1883".parse().expect("addr");
        assert_eq!(local_addr(specific), specific);
    }
}
