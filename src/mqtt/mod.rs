//! Everything that speaks MQTT: the embedded broker, the subscriber that takes
//! heartbeats in, and the publisher that puts status events out.
//!
//! The hub reaches the embedded broker over TCP with the same client as an external
//! broker, so after the connection is made the two modes run the same code.

pub mod broker;
pub mod logins;
pub mod publisher;
pub mod subscriber;
pub mod tls;
pub mod topic;

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{ConnectReturnCode, ConnectionError, MqttOptions, TlsConfiguration, Transport};

/// Where the hub's MQTT clients connect, and as whom.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub credentials: Option<(String, String)>,
    /// TLS (an external broker at `mqtts://`); `None`: plain TCP.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Prefix of the hub's client ids; each connection appends its role.
    pub client_id: String,
    /// Largest heartbeat payload the hub accepts; bigger ones are counted and dropped.
    pub max_payload: usize,
    /// The shared subscription group several hubs read heartbeats through, if any.
    pub shared_group: Option<String>,
}

/// How long the events connection may stay idle before a ping.
pub(crate) const EVENTS_KEEP_ALIVE: Duration = Duration::from_secs(30);
/// The ingest connection pings often: a half-open connection must be noticed well
/// within `offline_after`, because while it lasts the hub hears nothing.
pub(crate) const INGEST_KEEP_ALIVE: Duration = Duration::from_secs(5);

impl Endpoint {
    /// Client options for one of the hub's connections (`role`: "ingest", "events").
    ///
    /// Incoming packets may be twice the payload limit plus headroom for the topic, so
    /// a device sending an oversized heartbeat is counted and dropped by the hub
    /// instead of breaking the hub's own connection.
    pub fn options(&self, role: &str, keep_alive: Duration) -> MqttOptions {
        let mut options = MqttOptions::new(
            format!("{}-{role}", self.client_id),
            self.host.clone(),
            self.port,
        );
        options
            .set_keep_alive(keep_alive)
            .set_clean_session(true)
            .set_max_packet_size(incoming_packet_limit(self.max_payload), 256 * 1024);
        if let Some((user, password)) = &self.credentials {
            options.set_credentials(user.clone(), password.clone());
        }
        if let Some(config) = &self.tls {
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::clone(config),
            )));
        }
        options
    }
}

/// What an operator should do about a connection error that retrying will not fix
/// (a refused login, a certificate the hub does not trust), or `None` for the
/// ordinary kind (the broker is down or unreachable) that goes away by itself.
pub(crate) fn needs_attention(error: &ConnectionError) -> Option<&'static str> {
    match error {
        ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword) => {
            Some("bad username or password (check mqtt.username and mqtt.password)")
        }
        // What Mosquitto answers a wrong password with under MQTT 3.1.1.
        ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized) => {
            Some("not authorised: bad username or password (check mqtt.username and mqtt.password)")
        }
        ConnectionError::ConnectionRefused(_) => Some("refused by the broker"),
        ConnectionError::Tls(_) => {
            Some("TLS handshake failed (check mqtt.url's host name and mqtt.ca_file)")
        }
        _ => None,
    }
}

/// Logs broker connection failures without flooding: a failure that needs an operator
/// is logged once at error level (and again only when it changes), the ordinary kind
/// at warn on each retry, as before.
#[derive(Debug, Default)]
pub(crate) struct FailureLog {
    reported: Option<&'static str>,
}

impl FailureLog {
    /// `connection`: which of the hub's connections failed, for the log line.
    pub(crate) fn failed(
        &mut self,
        connection: &'static str,
        error: &ConnectionError,
        retry_in: Duration,
    ) -> bool {
        match needs_attention(error) {
            Some(advice) if self.reported == Some(advice) => {
                tracing::debug!(connection, error = %error, "still refused by the MQTT broker");
                true
            }
            Some(advice) => {
                self.reported = Some(advice);
                tracing::error!(
                    connection,
                    error = %error,
                    retry_in_ms = retry_in.as_millis() as u64,
                    "cannot connect to the MQTT broker: {advice}; retrying with backoff"
                );
                true
            }
            None => {
                self.reported = None;
                false
            }
        }
    }

    /// The connection is up: the next refusal is news again.
    pub(crate) fn connected(&mut self) {
        if self.reported.take().is_some() {
            tracing::info!("the MQTT broker accepted the hub's connection");
        }
    }
}

/// The largest packet (MQTT remaining length: topic plus payload) a broker should
/// accept from a device. A payload between the hub's limit and this reaches the hub
/// and is counted as too large; anything bigger the broker refuses itself (rumqttd
/// `max_payload_size`, Mosquitto `max_packet_size` in mosquitto/mosquitto.conf).
pub fn broker_packet_limit(max_payload: usize) -> usize {
    max_payload.saturating_mul(2).saturating_add(1024)
}

/// The hub clients' incoming packet limit: above anything the broker lets through, so
/// no device can break the hub's own connection with a big message.
fn incoming_packet_limit(max_payload: usize) -> usize {
    broker_packet_limit(max_payload).saturating_add(4 * 1024)
}

/// Exponential reconnect delay: rumqttc reconnects on the next poll with no pause of
/// its own, so callers sleep `next()` after every error.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    pub(crate) fn new() -> Self {
        Self { next: Self::FIRST }
    }

    pub(crate) fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    pub(crate) fn next(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        delay
    }
}
