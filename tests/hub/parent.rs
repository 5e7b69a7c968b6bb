//! Dependencies (interface.md "Dependencies"): devices name the gateway they are
//! reached through in their heartbeats (a firmware-sim fleet behind one gateway) or
//! through the API, and the API lists a gateway's children.

use std::time::Duration;

use firmware_sim::{Fleet, FleetConfig, QoS};
use fleetwatch::heartbeat::RejectReason;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{Broker, PATIENCE, TestApp, eventually, spawn_app};

async fn children(app: &TestApp, parent: &str) -> Vec<String> {
    let page = app
        .get_json(&format!("/api/v1/devices?parent={parent}"))
        .await;
    page["devices"]
        .as_array()
        .unwrap_or_else(|| panic!("a page: {page}"))
        .iter()
        .map(|d| d["device_id"].as_str().expect("id").to_string())
        .collect()
}

async fn patch(app: &TestApp, id: &str, change: Value) -> (StatusCode, Value) {
    let response = app
        .request(Method::PATCH, &format!("/api/v1/devices/{id}"))
        .json(&change)
        .send()
        .await
        .expect("request");
    let status = response.status();
    (status, response.json().await.expect("a JSON body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_name_their_gateway_and_the_api_lists_and_changes_them() {
    let app = spawn_app(Broker::Embedded).await;
    // The gateway, and a fleet of three behind it naming it in every heartbeat.
    let _gateway = app.device("gw-1", Duration::from_secs(1)).await;
    let fleet = Fleet::start(FleetConfig {
        url: app.url.clone(),
        devices: 3,
        interval: Duration::from_millis(500),
        jitter: Duration::ZERO,
        id_prefix: "child-".into(),
        qos: QoS::AtLeastOnce,
        connections: 1,
        error_rate: 0.0,
        lwt: false,
        declare_interval: false,
        labels: Vec::new(),
        parent: Some("gw-1".into()),
    });
    eventually(PATIENCE, "the three children listed under gw-1", || async {
        children(&app, "gw-1").await == ["child-0", "child-1", "child-2"]
    })
    .await;
    let child = app.get_json("/api/v1/devices/child-1").await;
    assert_eq!(child["parent"], json!("gw-1"), "{child}");
    let gateway = app.get_json("/api/v1/devices/gw-1").await;
    assert_eq!(gateway["parent"], Value::Null, "{gateway}");
    assert!(children(&app, "child-1").await.is_empty());

    // Over HTTP, and through the API: set, listed, changed, cleared; `{}` changes
    // nothing.
    let response = app
        .request(Method::POST, "/api/v1/devices/solo/heartbeat")
        .json(&json!({"parent": "gw-2"}))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(children(&app, "gw-2").await, ["solo"]);
    let (status, device) = patch(&app, "solo", json!({"parent": "gw-1"})).await;
    assert_eq!(status, StatusCode::OK, "{device}");
    assert_eq!(device["parent"], json!("gw-1"));
    assert_eq!(
        children(&app, "gw-1").await,
        ["child-0", "child-1", "child-2", "solo"]
    );
    assert!(children(&app, "gw-2").await.is_empty());
    let (status, device) = patch(&app, "solo", json!({})).await;
    assert_eq!(
        (status, &device["parent"]),
        (StatusCode::OK, &json!("gw-1"))
    );
    let (status, device) =
        patch(&app, "solo", json!({"parent": null, "offline_after": "1h"})).await;
    assert_eq!(status, StatusCode::OK, "{device}");
    assert_eq!(
        (&device["parent"], &device["offline_after"]),
        (&Value::Null, &json!("1h"))
    );
    assert_eq!(app.stored("solo").await.and_then(|d| d.parent), None);

    // A heartbeat without `parent` keeps it; one with `null` clears it.
    let raw = app.raw("parent-raw").await;
    raw.publish("devices/leaf/heartbeat", r#"{"parent":"gw-1"}"#)
        .await
        .expect("publish");
    eventually(PATIENCE, "leaf under gw-1", || async {
        app.stored("leaf")
            .await
            .is_some_and(|d| d.parent.is_some_and(|p| p.as_str() == "gw-1"))
    })
    .await;
    raw.publish("devices/leaf/heartbeat", r#"{"hostname":"leaf"}"#)
        .await
        .expect("publish");
    eventually(PATIENCE, "leaf's hostname", || async {
        app.stored("leaf")
            .await
            .is_some_and(|d| d.report.hostname.as_deref() == Some("leaf"))
    })
    .await;
    assert_eq!(
        app.stored("leaf")
            .await
            .and_then(|d| d.parent)
            .map(|p| p.to_string()),
        Some("gw-1".into())
    );
    raw.publish("devices/leaf/heartbeat", r#"{"parent":null}"#)
        .await
        .expect("publish");
    eventually(PATIENCE, "leaf's parent cleared", || async {
        app.stored("leaf").await.is_some_and(|d| d.parent.is_none())
    })
    .await;

    // A device naming itself is a malformed heartbeat, over MQTT and HTTP.
    let before = app.metrics.rejected(RejectReason::InvalidField);
    raw.publish("devices/loop-1/heartbeat", r#"{"parent":"loop-1"}"#)
        .await
        .expect("publish");
    eventually(PATIENCE, "the self-parent heartbeat rejected", || async {
        app.metrics.rejected(RejectReason::InvalidField) > before
    })
    .await;
    assert!(app.stored("loop-1").await.is_none());
    let response = app
        .request(Method::POST, "/api/v1/devices/loop-1/heartbeat")
        .json(&json!({"parent": "loop-1"}))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value = response.json().await.expect("a JSON body");
    assert!(body.to_string().contains("is the device itself"), "{body}");

    // The API refuses the same, and ids that are none.
    let (status, body) = patch(&app, "solo", json!({"parent": "solo"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body.to_string().contains("is the device itself"), "{body}");
    let (status, body) = patch(&app, "solo", json!({"parent": "gw/1"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    // An array is no change, even one that a struct's fields could be read from.
    let (status, body) = patch(&app, "solo", json!([null, null])).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(
        app.stored("solo").await.and_then(|d| d.offline_after),
        Some(Duration::from_secs(3600))
    );
    let (status, body) = patch(&app, "nobody", json!({"parent": "gw-1"})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let response = app.send(Method::GET, "/api/v1/devices?parent=-gw").await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    fleet.stop().await;
    app.stop().await;
}
