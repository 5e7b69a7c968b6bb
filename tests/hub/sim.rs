//! firmware-sim as the tests and the benchmarks use it.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use firmware_sim::{Fleet, FleetConfig, QoS};

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_fleet_has_delivered_every_heartbeat_it_counted_as_sent() {
    let app = spawn_app(Broker::Embedded).await;
    let fleet = Fleet::start(FleetConfig {
        url: app.url.clone(),
        devices: 400,
        interval: Duration::from_millis(100),
        jitter: Duration::ZERO,
        id_prefix: "fin-".into(),
        qos: QoS::AtMostOnce,
        connections: 4,
        error_rate: 0.0,
        lwt: true,
        declare_interval: false,
        labels: Vec::new(),
        parent: None,
    });
    let stats = Arc::clone(&fleet.stats);
    eventually(PATIENCE, "the fleet to send", || async {
        stats.sent.load(Relaxed) >= 2_000
    })
    .await;
    let clean = fleet.finish(PATIENCE).await;
    assert_eq!(clean, 4, "every connection disconnects cleanly");
    let sent = stats.sent.load(Relaxed);
    eventually(
        PATIENCE,
        "every sent heartbeat to reach the hub",
        || async { app.metrics.heartbeats_received.load(Relaxed) >= sent },
    )
    .await;
    assert_eq!(app.metrics.heartbeats_received.load(Relaxed), sent);
    // A clean end is not a lost connection: no Will fired.
    assert_eq!(app.metrics.wills_received.load(Relaxed), 0);
    app.stop().await;
}
