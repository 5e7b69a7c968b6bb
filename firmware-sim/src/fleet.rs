//! Many devices over few connections.
//!
//! Device `i` belongs to connection `i % connections`. Each connection task keeps its
//! devices in a deadline heap and publishes whatever is due, so a million devices cost
//! a heap entry each, not a task each. First heartbeats are spread evenly over one
//! interval, so the fleet's rate is steady from the start.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use rand::Rng;
use rumqttc::QoS;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{self, Instant};

use crate::connection::{self, ConnectionSpec};
use crate::{BrokerUrl, heartbeat_declaring};

#[derive(Clone, Debug)]
pub struct FleetConfig {
    pub url: BrokerUrl,
    pub devices: u64,
    pub interval: Duration,
    /// Each interval is drawn from `interval ± jitter`.
    pub jitter: Duration,
    pub id_prefix: String,
    pub qos: QoS,
    pub connections: u64,
    /// Fraction (0..=1) of heartbeats that report `"status":"error"`.
    pub error_rate: f64,
    /// Each connection leaves a Will for its first device.
    pub lwt: bool,
    /// Every heartbeat says `interval`, so the hub knows when beats are missed.
    pub declare_interval: bool,
    /// Labels every device's heartbeats declare, `(key, value)`.
    pub labels: Vec<(String, String)>,
    /// The device every device's heartbeats name as their `parent` (a gateway's id);
    /// a device of the fleet with that very id names none.
    pub parent: Option<String>,
}

impl FleetConfig {
    /// The id of device `index`, zero-padded so ids sort in index order.
    pub fn device_id(&self, index: u64) -> String {
        let width = self.devices.saturating_sub(1).max(1).to_string().len();
        format!("{}{index:0width$}", self.id_prefix)
    }
}

/// Counters shared with whoever reports progress.
#[derive(Debug, Default)]
pub struct FleetStats {
    pub sent: AtomicU64,
    pub errors: AtomicU64,
    pub connected: AtomicU64,
}

pub struct Fleet {
    tasks: JoinSet<()>,
    finish: watch::Sender<bool>,
    pub stats: Arc<FleetStats>,
}

impl Fleet {
    pub fn start(config: FleetConfig) -> Self {
        let stats = Arc::new(FleetStats::default());
        let config = Arc::new(config);
        let connections = config.connections.clamp(1, config.devices.max(1));
        let mut tasks = JoinSet::new();
        let start = Instant::now();
        let (finish, finishing) = watch::channel(false);
        for connection in 0..connections {
            tasks.spawn(run_connection(
                Arc::clone(&config),
                connection,
                connections,
                start,
                Arc::clone(&stats),
                finishing.clone(),
            ));
        }
        Self {
            tasks,
            finish,
            stats,
        }
    }

    /// Stops every connection (abruptly: Wills fire if configured).
    pub async fn stop(mut self) {
        self.tasks.shutdown().await;
    }

    /// Stops publishing, hands every heartbeat already counted as sent to the broker,
    /// and disconnects cleanly (no Will). Connections that do not finish within
    /// `limit` are dropped; returns how many finished cleanly.
    pub async fn finish(mut self, limit: Duration) -> u64 {
        self.finish.send_replace(true);
        let mut clean = 0;
        let deadline = Instant::now() + limit;
        while let Ok(Some(joined)) = time::timeout_at(deadline, self.tasks.join_next()).await {
            if joined.is_ok() {
                clean += 1;
            }
        }
        self.tasks.shutdown().await;
        clean
    }
}

async fn run_connection(
    config: Arc<FleetConfig>,
    connection: u64,
    connections: u64,
    start: Instant,
    stats: Arc<FleetStats>,
    mut finishing: watch::Receiver<bool>,
) {
    let first = config.device_id(connection);
    let client_id = if connections == config.devices {
        first.clone()
    } else {
        format!("{}conn-{connection}", config.id_prefix)
    };
    let (client, eventloop) = connection::open(ConnectionSpec {
        url: &config.url,
        client_id,
        will_for: config.lwt.then_some(first.as_str()),
        keep_alive: Duration::from_secs(30),
        inflight: 1000,
        capacity: 1024,
    });
    let (connected_tx, mut connected) = watch::channel(false);
    let errors = Arc::new(AtomicU64::new(0));
    let mut network = AbortOnDrop(tokio::spawn(connection::drive(
        eventloop,
        connected_tx,
        Arc::clone(&errors),
    )));
    if connected.wait_for(|up| *up).await.is_err() {
        return;
    }
    stats.connected.fetch_add(1, Relaxed);

    let mut due: BinaryHeap<Reverse<(Instant, u64)>> = (connection..config.devices)
        .step_by(connections as usize)
        .map(|index| {
            let offset = config
                .interval
                .mul_f64(index as f64 / config.devices as f64);
            Reverse((start + offset, index))
        })
        .collect();
    let mut reported_errors = 0;
    let mut was_connected = true;
    while let Some(Reverse((when, index))) = due.pop() {
        tokio::select! {
            _ = time::sleep_until(when) => {}
            _ = finishing.wait_for(|finish| *finish) => break,
        }
        let now_connected = *connected.borrow();
        if now_connected != was_connected {
            if now_connected {
                stats.connected.fetch_add(1, Relaxed);
            } else {
                stats.connected.fetch_sub(1, Relaxed);
            }
            was_connected = now_connected;
        }
        let total_errors = errors.load(Relaxed);
        stats
            .errors
            .fetch_add(total_errors - reported_errors, Relaxed);
        reported_errors = total_errors;

        let id = config.device_id(index);
        let error = rand::thread_rng()
            .gen_bool(config.error_rate.clamp(0.0, 1.0))
            .then_some("simulated fault");
        let uptime = start.elapsed().as_secs();
        let payload = heartbeat_declaring(
            &id,
            uptime,
            error,
            config.declare_interval.then_some(config.interval),
            &config.labels,
            config.parent.as_deref().filter(|parent| *parent != id),
        );
        match client
            .publish(
                format!("devices/{id}/heartbeat"),
                config.qos,
                false,
                payload,
            )
            .await
        {
            Ok(()) => stats.sent.fetch_add(1, Relaxed),
            Err(_) => stats.errors.fetch_add(1, Relaxed),
        };
        due.push(Reverse((when + next_interval(&config), index)));
    }
    // The DISCONNECT queues behind every publish already handed to the client, and the
    // event loop ends once it is written.
    if client.disconnect().await.is_ok() {
        let _ = (&mut network.0).await;
    }
}

fn next_interval(config: &FleetConfig) -> Duration {
    if config.jitter.is_zero() {
        return config.interval;
    }
    let jitter = config.jitter.as_secs_f64();
    let offset = rand::thread_rng().gen_range(-jitter..=jitter);
    Duration::from_secs_f64((config.interval.as_secs_f64() + offset).max(0.001))
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_zero_padded_to_the_fleet_size() {
        let config = FleetConfig {
            url: BrokerUrl::new("localhost", 1883),
            devices: 1000,
            interval: Duration::from_secs(1),
            jitter: Duration::ZERO,
            id_prefix: "sim-".into(),
            qos: QoS::AtMostOnce,
            connections: 1,
            error_rate: 0.0,
            lwt: false,
            declare_interval: false,
            labels: Vec::new(),
            parent: None,
        };
        assert_eq!(config.device_id(7), "sim-007");
        assert_eq!(config.device_id(999), "sim-999");
    }
}
