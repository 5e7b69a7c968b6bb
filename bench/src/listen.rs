//! Subscribers that only listen: one counts messages (the broker's drain rate, the
//! baseline for ingest), one records offline status events with their arrival time.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use firmware_sim::{BrokerUrl, QoS};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// An offline status event as it arrived.
#[derive(Debug, Clone)]
pub struct Offline {
    pub device_id: String,
    /// Wall clock at arrival, Unix milliseconds.
    pub arrived_ms: i64,
    pub last_seen_ms: i64,
}

#[derive(Default)]
pub struct Heard {
    pub messages: AtomicU64,
    pub offline: Mutex<Vec<Offline>>,
}

impl Heard {
    pub fn offline(&self) -> Vec<Offline> {
        self.offline.lock().map(|v| v.clone()).unwrap_or_default()
    }

    pub fn offline_count(&self) -> usize {
        self.offline.lock().map(|v| v.len()).unwrap_or(0)
    }
}

pub struct Listener {
    pub heard: Arc<Heard>,
    task: JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Subscribes to `topic` and returns once the broker has acknowledged the
/// subscription. With `record_offline`, payloads are parsed as status events.
pub async fn listen(
    url: &BrokerUrl,
    topic: &str,
    qos: QoS,
    record_offline: bool,
) -> Result<Listener> {
    let client_id = format!("bench-listener-{}", std::process::id());
    let mut options = MqttOptions::new(
        format!("{client_id}-{}", rand_suffix()),
        url.host.clone(),
        url.port,
    );
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(1024 * 1024, 1024 * 1024);
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let heard = Arc::new(Heard::default());
    let (subscribed_tx, subscribed) = oneshot::channel();
    let topic = topic.to_string();
    let task = tokio::spawn({
        let heard = Arc::clone(&heard);
        async move {
            let mut subscribed_tx = Some(subscribed_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        // Never await on the client from the task that polls it.
                        let _ = client.try_subscribe(topic.clone(), qos);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        heard.messages.fetch_add(1, Relaxed);
                        if record_offline
                            && let Some(event) = offline_event(&publish.payload)
                            && let Ok(mut v) = heard.offline.lock()
                        {
                            v.push(event);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), subscribed)
        .await
        .context("no SUBACK within 10 s")?
        .context("listener stopped")?;
    Ok(Listener { heard, task })
}

fn offline_event(payload: &[u8]) -> Option<Offline> {
    let arrived_ms = chrono::Utc::now().timestamp_millis();
    let event: serde_json::Value = serde_json::from_slice(payload).ok()?;
    if event.get("status")?.as_str()? != "offline" {
        return None;
    }
    let last_seen = event.get("last_seen_at")?.as_str()?;
    let last_seen_ms = chrono::DateTime::parse_from_rfc3339(last_seen)
        .ok()?
        .timestamp_millis();
    Some(Offline {
        device_id: event.get("device_id")?.as_str()?.to_string(),
        arrived_ms,
        last_seen_ms,
    })
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() % 1_000_000_007)
        .unwrap_or(0)
}
