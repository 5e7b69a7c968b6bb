//! Who may become a device: a flood of invented ids stops at the cap and the rate,
//! auto-registration can be off, and devices already known never notice any of it.

use std::time::Duration;

use fleetwatch::heartbeat::RejectReason;
use fleetwatch::status::Status;
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::*;

/// One anonymous connection publishes a heartbeat for each of `count` invented ids.
/// Keep the publisher until they are handled: dropping it drops what it still queues.
async fn flood(app: &TestApp, prefix: &str, count: usize) -> firmware_sim::RawPublisher {
    let raw = app.raw(&format!("{prefix}flooder")).await;
    for i in 0..count {
        raw.publish(&format!("devices/{prefix}{i}/heartbeat"), b"{}".to_vec())
            .await
            .expect("publish");
    }
    raw
}

async fn heartbeat(app: &TestApp, id: &str) -> reqwest::Response {
    app.send(Method::POST, &format!("/api/v1/devices/{id}/heartbeat"))
        .await
}

async fn total(app: &TestApp) -> u64 {
    app.get_json("/api/v1/summary").await["total"]
        .as_u64()
        .expect("total")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_flood_stops_at_the_cap_and_known_devices_carry_on() {
    let app = spawn_app_with(Broker::Embedded, |s| {
        s.devices.max_devices = 200;
        s.devices.registration_rate = 0.0;
    })
    .await;
    let mut watcher = app.watch().await;
    let _steady = app.device("steady", Duration::from_millis(300)).await;
    watcher.expect("steady", Status::Online, "registered").await;

    let _flooder = flood(&app, "invented-", 5_000).await;
    eventually(PATIENCE, "every invented id to be handled", || async {
        app.metrics.rejected(RejectReason::DeviceLimit) >= 5_000 - 199
    })
    .await;
    assert_eq!(total(&app).await, 200, "the cap holds");
    assert_eq!(
        app.metrics.rejected(RejectReason::DeviceLimit),
        5_000 - 199,
        "each refused id counted once"
    );

    // Over HTTP too, for a heartbeat and for an operator's registration.
    assert_eq!(
        heartbeat(&app, "one-more").await.status(),
        StatusCode::FORBIDDEN
    );
    let registration = app
        .request(Method::POST, "/api/v1/devices")
        .json(&json!({"device_id": "one-more"}))
        .send()
        .await
        .expect("request");
    assert_eq!(registration.status(), StatusCode::FORBIDDEN);
    assert_eq!(total(&app).await, 200);

    // Known devices are unaffected.
    assert_eq!(heartbeat(&app, "steady").await.status(), StatusCode::OK);
    assert_eq!(heartbeat(&app, "invented-0").await.status(), StatusCode::OK);
    watcher.collect_for(OFFLINE_AFTER).await;
    assert_eq!(watcher.unread("steady"), vec![], "steady saw no transition");
    assert_eq!(app.status_of("steady").await, Some(Status::Online));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_devices_past_the_registration_rate_are_refused_and_told_when_to_retry() {
    let app = spawn_app_with(Broker::Embedded, |s| {
        s.devices.registration_rate = 0.001;
        s.devices.registration_burst = 5;
    })
    .await;
    let _flooder = flood(&app, "burst-", 50).await;
    eventually(PATIENCE, "every id to be handled", || async {
        app.metrics.rejected(RejectReason::RegistrationRate) >= 45
    })
    .await;
    assert_eq!(total(&app).await, 5, "the burst, and nothing more");
    assert_eq!(app.metrics.rejected(RejectReason::RegistrationRate), 45);

    let refused = heartbeat(&app, "latecomer").await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = refused
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After in seconds");
    assert!(
        (900..=1000).contains(&retry_after),
        "one registration per 1,000 s: {retry_after}"
    );
    // Devices already registered beat on.
    let known = heartbeat(&app, "burst-0").await;
    assert_eq!(known.status(), StatusCode::OK);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_auto_registration_only_registered_devices_are_heard() {
    let app = spawn_app_with(Broker::Embedded, |s| {
        s.devices.auto_register = false;
    })
    .await;
    let _stranger = app.device("stranger", Duration::from_millis(200)).await;
    eventually(
        PATIENCE,
        "the stranger's heartbeats to be refused",
        || async { app.metrics.rejected(RejectReason::Unregistered) >= 2 },
    )
    .await;
    assert_eq!(app.status_of("stranger").await, None);
    assert_eq!(
        heartbeat(&app, "stranger").await.status(),
        StatusCode::NOT_FOUND
    );

    let registration = app
        .request(Method::POST, "/api/v1/devices")
        .json(&json!({"device_id": "stranger"}))
        .send()
        .await
        .expect("request");
    assert_eq!(registration.status(), StatusCode::CREATED);
    eventually(PATIENCE, "the registered device to come online", || async {
        app.status_of("stranger").await == Some(Status::Online)
    })
    .await;
    let ack = heartbeat(&app, "stranger").await;
    assert_eq!(ack.status(), StatusCode::OK);
    assert_eq!(
        ack.json::<serde_json::Value>().await.expect("json")["registered"],
        false
    );
    app.stop().await;
}
