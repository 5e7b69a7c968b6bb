//! Silences (interface.md "Silences"): created, listed and expired through the API,
//! shown on the devices they cover, and refused with a 400 naming what is wrong.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{Broker, TestApp, spawn_app};
use fleetwatch::status::Status;

/// Sends `body` to `path` with `method` and reads the JSON answer.
async fn send_json(app: &TestApp, method: Method, path: &str, body: Value) -> (StatusCode, Value) {
    let response = app
        .request(method, path)
        .json(&body)
        .send()
        .await
        .expect("request");
    let status = response.status();
    (status, response.json().await.expect("a JSON body"))
}

/// A heartbeat over HTTP, answered once committed.
async fn beat(app: &TestApp, id: &str, body: Value) {
    let (status, answer) = send_json(
        app,
        Method::POST,
        &format!("/api/v1/devices/{id}/heartbeat"),
        body,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
}

/// Each listed device's `silenced_until`, by id.
async fn silenced(app: &TestApp) -> Vec<(String, Option<String>)> {
    let page = app.get_json("/api/v1/devices").await;
    page["devices"]
        .as_array()
        .unwrap_or_else(|| panic!("a page: {page}"))
        .iter()
        .map(|d| {
            (
                d["device_id"].as_str().expect("id").to_string(),
                d.get("silenced_until")
                    .map(|t| t.as_str().expect("a time").to_string()),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silence_over_labels_marks_the_devices_it_covers_until_it_is_expired() {
    let app = spawn_app(Broker::Embedded).await;
    beat(
        &app,
        "pump-1",
        json!({"labels": {"site": "north", "kind": "pump"}}),
    )
    .await;
    beat(
        &app,
        "pump-2",
        json!({"labels": {"site": "south", "kind": "pump"}}),
    )
    .await;

    let (status, silence) = send_json(
        &app,
        Method::POST,
        "/api/v1/silences",
        json!({"labels": {"site": "north"}, "duration": "2h", "comment": "pump swap"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{silence}");
    assert_eq!(silence["labels"], json!({"site": "north"}));
    assert!(silence.get("device_ids").is_none() && silence.get("pattern").is_none());
    assert_eq!(silence["comment"], "pump swap");
    let id = silence["id"].as_i64().expect("an id");
    let time = |field: &str| {
        chrono::DateTime::parse_from_rfc3339(silence[field].as_str().expect("a time"))
            .expect("RFC 3339")
    };
    assert_eq!((time("ends_at") - time("starts_at")).num_seconds(), 7_200);
    let ends_at = silence["ends_at"].as_str().expect("a time").to_string();

    let listed = app.get_json("/api/v1/silences").await;
    assert_eq!(listed["silences"], json!([silence.clone()]));
    assert_eq!(
        silenced(&app).await,
        [
            ("pump-1".to_string(), Some(ends_at.clone())),
            ("pump-2".to_string(), None)
        ]
    );
    let one = app.get_json("/api/v1/devices/pump-1").await;
    assert_eq!(one["silenced_until"], ends_at.as_str());
    assert!(
        app.get_json("/api/v1/devices/pump-2")
            .await
            .get("silenced_until")
            .is_none()
    );

    // Silencing changes nothing the hub records or publishes: a device joining the
    // silenced site is registered and announced as usual.
    let mut watcher = app.watch().await;
    beat(&app, "pump-3", json!({"labels": {"site": "north"}})).await;
    watcher.expect("pump-3", Status::Online, "registered").await;
    assert_eq!(
        app.get_json("/api/v1/devices/pump-3").await["silenced_until"],
        ends_at.as_str()
    );

    let response = app
        .send(Method::DELETE, &format!("/api/v1/silences/{id}"))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let expired: Value = response.json().await.expect("a JSON body");
    assert_eq!(expired["id"], id);
    assert!(
        chrono::DateTime::parse_from_rfc3339(expired["ends_at"].as_str().expect("a time"))
            .expect("RFC 3339")
            < time("ends_at"),
        "ended early: {expired}"
    );
    assert_eq!(
        app.get_json("/api/v1/silences").await["silences"],
        json!([])
    );
    assert_eq!(
        app.get_json("/api/v1/silences?all=true").await["silences"],
        json!([expired]),
        "an expired silence is kept as a record"
    );
    assert!(
        silenced(&app)
            .await
            .iter()
            .all(|(_, until)| until.is_none())
    );

    let response = app.send(Method::DELETE, "/api/v1/silences/999999").await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let response = app.send(Method::DELETE, "/api/v1/silences/pump").await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silences_by_id_list_and_pattern_cover_only_what_they_name() {
    let app = spawn_app(Broker::Embedded).await;
    for id in ["pump-1", "pump-2", "valve-1"] {
        beat(&app, id, json!({})).await;
    }
    for body in [
        json!({"device_ids": ["valve-1"], "ends_at": "2999-01-01T00:00:00Z"}),
        json!({"pattern": "pump-?", "starts_at": "2999-01-01T00:00:00Z", "duration": "1h"}),
    ] {
        let (status, answer) = send_json(&app, Method::POST, "/api/v1/silences", body).await;
        assert_eq!(status, StatusCode::CREATED, "{answer}");
    }
    assert_eq!(
        silenced(&app).await,
        [
            ("pump-1".to_string(), None),
            ("pump-2".to_string(), None),
            (
                "valve-1".to_string(),
                Some("2999-01-01T00:00:00.000Z".to_string())
            ),
        ],
        "the pattern's silence has not started"
    );
    let listed = app.get_json("/api/v1/silences").await;
    let starts: Vec<&str> = listed["silences"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|s| s["starts_at"].as_str().expect("a time"))
        .collect();
    assert_eq!(starts.len(), 2, "{listed}");
    assert_eq!(starts[1], "2999-01-01T00:00:00.000Z", "listed by start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_silence_is_refused_with_a_400_naming_the_field() {
    let app = spawn_app(Broker::Embedded).await;
    for (body, says) in [
        (
            json!({"device_ids": ["a"], "pattern": "a*", "duration": "1h"}),
            "exactly one of device_ids, pattern or labels",
        ),
        (json!({"duration": "1h"}), "exactly one of"),
        (json!({"device_ids": [], "duration": "1h"}), "device_ids"),
        (
            json!({"device_ids": ["ok", "no way"], "duration": "1h"}),
            "device_ids[1]",
        ),
        (json!({"pattern": "a/b", "duration": "1h"}), "pattern"),
        (json!({"labels": {}, "duration": "1h"}), "labels"),
        (json!({"pattern": "*"}), "ends_at"),
        (
            json!({"pattern": "*", "starts_at": "2999-01-02T00:00:00Z", "ends_at": "2999-01-01T00:00:00Z"}),
            "after starts_at",
        ),
        (
            json!({"pattern": "*", "ends_at": "2001-01-01T00:00:00Z"}),
            "not in the future",
        ),
        (json!({"pattern": "*", "duration": "soon"}), "duration"),
        (
            json!({"pattern": "*", "duration": "1h", "reason": "x"}),
            "reason",
        ),
        (json!({"pattern": 7, "duration": "1h"}), "invalid type"),
        (json!(["pattern"]), "invalid type"),
    ] {
        let (status, answer) =
            send_json(&app, Method::POST, "/api/v1/silences", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        let error = answer["error"].as_str().expect("an error");
        assert!(error.contains(says), "{body}: {error}");
    }
    assert_eq!(
        app.get_json("/api/v1/silences?all=true").await["silences"],
        json!([]),
        "nothing was stored"
    );
}
