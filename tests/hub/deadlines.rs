//! Per-device deadlines (interface.md "Deadlines"): each device goes offline at its
//! own deadline, from its own setting, its declared interval or the fleet's default,
//! and changing its setting through the API moves the deadline it is waiting on.

use std::time::Duration;

use firmware_sim::{DeviceConfig, SimDevice};
use fleetwatch::status::Status;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{Broker, PATIENCE, Setup, TestApp, eventually, spawn_app, spawn_app_with};

async fn patch(app: &TestApp, id: &str, body: Value) -> (StatusCode, Value) {
    let response = app
        .request(Method::PATCH, &format!("/api/v1/devices/{id}"))
        .json(&body)
        .send()
        .await
        .expect("request");
    let status = response.status();
    (status, response.json().await.expect("a JSON body"))
}

async fn declaring(app: &TestApp, id: &str, interval: Duration) -> SimDevice {
    let config = DeviceConfig::new(app.url.clone(), id)
        .interval(interval)
        .declare_interval(true);
    SimDevice::start(config).await.expect("device connects")
}

/// Fleet default 60 s, three missed beats. "quick" has 2 s of its own (and declares
/// 5 s, which its own setting outranks), "beats" declares 1 s (three missed: 3 s),
/// "slow" has 30 s of its own. All fall silent together: quick goes offline first,
/// then beats, each not before its own deadline, and slow stays online, until its
/// setting is cut to 1 s and its pending deadline moves with it.
pub async fn each_device_goes_offline_at_its_own_deadline(setup: Setup) {
    let app = spawn_app_with(setup, |s| {
        s.heartbeat.offline_after = Duration::from_secs(60);
        s.heartbeat.missed_beats = 3;
    })
    .await;
    let mut watch = app.watch().await;
    let quick = declaring(&app, "quick", Duration::from_secs(5)).await;
    let beats = declaring(&app, "beats", Duration::from_secs(1)).await;
    let slow = app.device("slow", Duration::from_secs(1)).await;
    for id in ["quick", "beats", "slow"] {
        watch.expect(id, Status::Online, "registered").await;
    }
    let (status, body) = patch(&app, "quick", json!({"offline_after": "2s"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (&body["offline_after"], &body["interval"]),
        (&json!("2s"), &json!("5s"))
    );
    let (status, body) = patch(&app, "slow", json!({"offline_after": "30s"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    eventually(PATIENCE, "beats's interval to be stored", || async {
        app.stored("beats")
            .await
            .is_some_and(|d| d.interval == Some(Duration::from_secs(1)))
    })
    .await;

    for device in [&quick, &beats, &slow] {
        device.silence().await.expect("silence");
    }
    let first = watch
        .expect("quick", Status::Offline, "heartbeat_timeout")
        .await;
    let second = watch
        .expect("beats", Status::Offline, "heartbeat_timeout")
        .await;
    for (event, offline_after) in [(&first, 2_000), (&second, 3_000)] {
        let seen = event.last_seen_at.expect("last seen");
        assert!(
            event.changed_at.millis_since(seen) >= offline_after,
            "{} went offline {} ms after its last heartbeat, before its deadline",
            event.device_id,
            event.changed_at.millis_since(seen)
        );
    }
    assert!(
        first.changed_at <= second.changed_at,
        "quick's deadline came first"
    );
    assert!(
        watch.unread("slow").is_empty(),
        "slow is not due for 30 s: {:?}",
        watch.unread("slow")
    );
    assert_eq!(app.status_of("slow").await, Some(Status::Online));

    let (status, body) = patch(&app, "slow", json!({"offline_after": "1s"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let moved = watch
        .expect("slow", Status::Offline, "heartbeat_timeout")
        .await;
    let silent_for = moved
        .changed_at
        .millis_since(moved.last_seen_at.expect("last seen"));
    assert!(
        (1_000..30_000).contains(&silent_for),
        "slow went offline {silent_for} ms after its last heartbeat: the new setting, not the old"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_devices_offline_after_is_checked_and_null_clears_it() {
    let app = spawn_app(Broker::Embedded).await;
    let (status, body) = patch(&app, "nobody", json!({"offline_after": "5s"})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    let device = app.device("pump-1", Duration::from_secs(1)).await;
    eventually(PATIENCE, "pump-1 to be stored", || async {
        app.stored("pump-1").await.is_some()
    })
    .await;
    for (bad, says) in [
        (json!({"offline_after": "721h"}), "between 1s and 30days"),
        (json!({"offline_after": "soon"}), "not a duration"),
        (json!({"offline_after": "1h 30m"}), "not a duration"),
        (json!({"offline_after": 20}), "offline_after"),
        (json!({"offline_after": "5s", "colour": "red"}), "colour"),
    ] {
        let (status, body) = patch(&app, "pump-1", bad.clone()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {body}");
        assert!(body.to_string().contains(says), "{bad}: {body}");
    }
    assert_eq!(
        app.stored("pump-1").await.and_then(|d| d.offline_after),
        None,
        "a refused change changes nothing"
    );
    let (status, unchanged) = patch(&app, "pump-1", json!({})).await;
    assert_eq!(status, StatusCode::OK, "naming nothing changes nothing");
    assert_eq!(unchanged["offline_after"], Value::Null);

    // The OpenAPI document states the grammar the parser accepts (a literal there,
    // checked against the parser's own pattern here and in deadline.rs's tests).
    let doc = app.get_json("/api/v1/openapi.json").await;
    assert_eq!(
        doc["components"]["schemas"]["DeviceChange"]["properties"]["offline_after"]["pattern"],
        json!(fleetwatch::deadline::DURATION_PATTERN)
    );
    let list_params = doc["paths"]["/api/v1/devices"]["get"]["parameters"]
        .as_array()
        .expect("parameters");
    let label = list_params
        .iter()
        .find(|p| p["name"] == "label")
        .expect("a label parameter");
    assert_eq!(
        label["schema"]["pattern"],
        json!(fleetwatch::labels::FILTER_PATTERN)
    );

    let (_, set) = patch(&app, "pump-1", json!({"offline_after": "1h"})).await;
    assert_eq!(set["offline_after"], json!("1h"));
    let (_, cleared) = patch(&app, "pump-1", json!({"offline_after": null})).await;
    assert_eq!(cleared["offline_after"], Value::Null);
    let seen = app
        .stored("pump-1")
        .await
        .and_then(|d| d.last_seen_at.zip(d.deadline_at));
    let (seen, deadline) = seen.expect("seen, with a deadline");
    assert_eq!(
        deadline.millis_since(seen),
        crate::helpers::OFFLINE_AFTER.as_millis() as i64,
        "cleared: the fleet's default again"
    );
    device.stop().await;
    app.stop().await;
}

/// A label rule in the configuration (`[[heartbeat.rules]]`): devices whose heartbeats
/// carry `kind: sensor` go offline after 2 s, the rest after the fleet's 60 s; a
/// device given the label through the API once it is silent has its pending deadline
/// moved to the rule's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_label_rule_sets_the_deadline_of_the_devices_carrying_its_labels() {
    let app = spawn_app_with(Broker::Embedded, |s| {
        s.heartbeat.offline_after = Duration::from_secs(60);
        s.heartbeat.rules = vec![fleetwatch::deadline::Rule {
            labels: serde_json::from_value(json!({"kind": "sensor"})).expect("labels"),
            offline_after: Duration::from_secs(2),
        }];
    })
    .await;
    let mut watch = app.watch().await;
    let sensor = SimDevice::start(
        DeviceConfig::new(app.url.clone(), "sensor-1")
            .interval(Duration::from_millis(500))
            .label("kind", "sensor"),
    )
    .await
    .expect("device connects");
    let pump = app.device("pump-1", Duration::from_millis(500)).await;
    let tagged = app.device("tagged-1", Duration::from_millis(500)).await;
    for id in ["sensor-1", "pump-1", "tagged-1"] {
        watch.expect(id, Status::Online, "registered").await;
    }
    let sensor_row = app.stored("sensor-1").await.expect("stored");
    let (seen, deadline) = sensor_row
        .last_seen_at
        .zip(sensor_row.deadline_at)
        .expect("seen, with a deadline");
    assert_eq!(
        deadline.millis_since(seen),
        2_000,
        "the rule's offline_after"
    );

    for device in [&sensor, &pump, &tagged] {
        device.silence().await.expect("silence");
    }
    let offline = watch
        .expect("sensor-1", Status::Offline, "heartbeat_timeout")
        .await;
    let silent_for = offline
        .changed_at
        .millis_since(offline.last_seen_at.expect("last seen"));
    assert!(
        (2_000..60_000).contains(&silent_for),
        "sensor-1 went offline {silent_for} ms after its last heartbeat, not at the rule's 2 s"
    );
    assert!(
        watch.unread("pump-1").is_empty(),
        "{:?}",
        watch.unread("pump-1")
    );
    assert_eq!(app.status_of("tagged-1").await, Some(Status::Online));

    let response = app
        .request(Method::PUT, "/api/v1/devices/tagged-1/labels")
        .json(&json!({"kind": "sensor", "site": "north"}))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);
    let moved = watch
        .expect("tagged-1", Status::Offline, "heartbeat_timeout")
        .await;
    let silent_for = moved
        .changed_at
        .millis_since(moved.last_seen_at.expect("last seen"));
    assert!(
        (2_000..60_000).contains(&silent_for),
        "tagged-1 went offline {silent_for} ms after its last heartbeat"
    );
    assert_eq!(app.status_of("pump-1").await, Some(Status::Online));
    app.stop().await;
}
