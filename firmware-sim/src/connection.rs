//! One MQTT connection driven in its own task, reconnecting with backoff.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, LastWill, Outgoing, Packet, QoS};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{BrokerUrl, SimError};

pub(crate) struct ConnectionSpec<'a> {
    pub url: &'a BrokerUrl,
    pub client_id: String,
    /// Device whose Will this connection carries.
    pub will_for: Option<&'a str>,
    pub keep_alive: Duration,
    pub inflight: u16,
    pub capacity: usize,
}

pub(crate) fn open(spec: ConnectionSpec<'_>) -> (AsyncClient, EventLoop) {
    let mut options = spec.url.mqtt_options(spec.client_id);
    options
        .set_keep_alive(spec.keep_alive)
        .set_inflight(spec.inflight)
        .set_max_packet_size(1024 * 1024, 1024 * 1024);
    if let Some(device) = spec.will_for {
        options.set_last_will(LastWill::new(
            format!("devices/{device}/lwt"),
            r#"{"reason":"connection_lost"}"#,
            QoS::AtLeastOnce,
            false,
        ));
    }
    AsyncClient::new(options, spec.capacity)
}

/// Polls `eventloop` until the client sends DISCONNECT, reporting the connection state
/// on `connected` and counting connection errors. Cancel by aborting the task: dropping
/// the event loop closes the socket without a DISCONNECT, which is what a crashed
/// device does.
pub(crate) async fn drive(
    mut eventloop: EventLoop,
    connected: watch::Sender<bool>,
    errors: Arc<AtomicU64>,
) {
    let mut delay = Duration::from_millis(50);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                delay = Duration::from_millis(50);
                connected.send_replace(true);
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                connected.send_replace(false);
                return;
            }
            Ok(_) => {}
            Err(_) => {
                connected.send_replace(false);
                errors.fetch_add(1, Relaxed);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// A connection whose event loop runs in its own task, once the broker has accepted it.
pub(crate) struct Connected {
    pub client: AsyncClient,
    pub connected: watch::Receiver<bool>,
    pub network: JoinHandle<()>,
}

/// Opens a connection and waits up to `timeout` for the broker's CONNACK.
pub(crate) async fn connect(
    spec: ConnectionSpec<'_>,
    timeout: Duration,
) -> Result<Connected, SimError> {
    let url = spec.url.clone();
    let (client, eventloop) = open(spec);
    let (connected_tx, mut connected) = watch::channel(false);
    let network = tokio::spawn(drive(eventloop, connected_tx, Arc::new(AtomicU64::new(0))));
    if tokio::time::timeout(timeout, connected.wait_for(|up| *up))
        .await
        .is_err()
    {
        network.abort();
        return Err(SimError::ConnectTimeout { url, timeout });
    }
    Ok(Connected {
        client,
        connected,
        network,
    })
}
