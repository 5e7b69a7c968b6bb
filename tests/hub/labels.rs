//! Labels (interface.md "Labels"): declared by heartbeats over MQTT and HTTP, replaced
//! through the API, and used to list a part of the fleet.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{Broker, PATIENCE, TestApp, eventually, spawn_app};

async fn ids(app: &TestApp, query: &str) -> Vec<String> {
    let page = app.get_json(&format!("/api/v1/devices?{query}")).await;
    page["devices"]
        .as_array()
        .unwrap_or_else(|| panic!("a page: {page}"))
        .iter()
        .map(|d| d["device_id"].as_str().expect("id").to_string())
        .collect()
}

async fn put_labels(app: &TestApp, id: &str, labels: Value) -> (StatusCode, Value) {
    let response = app
        .request(Method::PUT, &format!("/api/v1/devices/{id}/labels"))
        .json(&labels)
        .send()
        .await
        .expect("request");
    let status = response.status();
    (status, response.json().await.expect("a JSON body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_from_heartbeats_and_the_api_filter_the_fleet() {
    let app = spawn_app(Broker::Embedded).await;
    // Over HTTP, answered once committed.
    let response = app
        .request(Method::POST, "/api/v1/devices/pump-1/heartbeat")
        .json(&json!({"labels": {"site": "north", "kind": "pump"}}))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);
    // Over MQTT: a simulated device declaring its labels, and raw messages.
    let config = firmware_sim::DeviceConfig::new(app.url.clone(), "pump-2")
        .interval(std::time::Duration::from_secs(3600))
        .label("site", "south")
        .label("kind", "pump");
    let _pump = firmware_sim::SimDevice::start(config)
        .await
        .expect("device connects");
    let raw = app.raw("labeller").await;
    raw.publish(
        "devices/valve-1/heartbeat",
        r#"{"labels":{"site":"north","kind":"valve"}}"#,
    )
    .await
    .expect("publish");
    eventually(PATIENCE, "both MQTT devices stored", || async {
        app.stored("pump-2").await.is_some() && app.stored("valve-1").await.is_some()
    })
    .await;

    assert_eq!(ids(&app, "label=site:north").await, ["pump-1", "valve-1"]);
    assert_eq!(ids(&app, "label=site:north,kind:pump").await, ["pump-1"]);
    assert_eq!(ids(&app, "label=kind:pump&prefix=pump-2").await, ["pump-2"]);

    // An operator replaces valve-1's labels: it leaves the north.
    let (status, device) = put_labels(&app, "valve-1", json!({"site": "west", "room": "7"})).await;
    assert_eq!(status, StatusCode::OK, "{device}");
    assert_eq!(device["labels"], json!({"site": "west", "room": "7"}));
    assert_eq!(ids(&app, "label=site:north").await, ["pump-1"]);
    // Its next heartbeat sets only the keys it declares.
    raw.publish(
        "devices/valve-1/heartbeat",
        r#"{"labels":{"kind":"valve"}}"#,
    )
    .await
    .expect("publish");
    eventually(PATIENCE, "valve-1's declared key merged", || async {
        app.stored("valve-1")
            .await
            .is_some_and(|d| d.labels.get("kind") == Some("valve"))
    })
    .await;
    let device = app.get_json("/api/v1/devices/valve-1").await;
    assert_eq!(
        device["labels"],
        json!({"site": "west", "room": "7", "kind": "valve"})
    );

    let (status, body) = put_labels(&app, "nobody", json!({"site": "x"})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = put_labels(&app, "pump-1", json!({"si:te": "x"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body.to_string().contains("label key"), "{body}");
    let response = app.send(Method::GET, "/api/v1/devices?label=site").await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    app.stop().await;
}
