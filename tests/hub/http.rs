//! The HTTP API against a real hub: keys, every route, every error status, the HTTP
//! heartbeat's equivalence with MQTT, health, metrics, the event stream and the
//! OpenAPI document.

use std::collections::BTreeSet;
use std::time::Duration;

use fleetwatch::config::Secret;
use fleetwatch::status::Status;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::*;

const KEY: &str = "test-key-0123";

async fn keyed_app() -> TestApp {
    spawn_app_with(Broker::Embedded, |s| {
        s.http.api_key = Some(Secret::new(KEY));
        s.http.api_keys = vec![Secret::new("rotated-key")];
    })
    .await
}

/// `field` of every element of the array `page[list]`.
fn column(page: &Value, list: &str, field: &str) -> Vec<Value> {
    page[list]
        .as_array()
        .expect(list)
        .iter()
        .map(|item| item[field].clone())
        .collect()
}

async fn json_of(response: reqwest::Response) -> Value {
    response.json().await.expect("a JSON body")
}

/// Every route the router has, as the OpenAPI document must list them.
const ROUTES: [(&str, &str); 27] = [
    ("get", "/api/v1/devices"),
    ("post", "/api/v1/devices"),
    ("get", "/api/v1/devices/{id}"),
    ("delete", "/api/v1/devices/{id}"),
    ("patch", "/api/v1/devices/{id}"),
    ("get", "/api/v1/devices/{id}/events"),
    ("put", "/api/v1/devices/{id}/labels"),
    ("post", "/api/v1/devices/{id}/heartbeat"),
    ("post", "/api/v1/devices/{id}/credentials"),
    ("delete", "/api/v1/devices/{id}/credentials"),
    ("get", "/api/v1/summary"),
    ("get", "/api/v1/stream"),
    ("get", "/api/v1/openapi.json"),
    ("get", "/api/v1/sinks"),
    ("patch", "/api/v1/sinks/{name}"),
    ("post", "/api/v1/sinks/{name}/test"),
    ("get", "/api/v1/sinks/{name}/dead-letters"),
    ("post", "/api/v1/sinks/{name}/dead-letters/drop"),
    ("post", "/api/v1/sinks/{name}/dead-letters/retry"),
    ("get", "/api/v1/silences"),
    ("post", "/api/v1/silences"),
    ("delete", "/api/v1/silences/{id}"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/livez"),
    ("get", "/metrics"),
    ("get", "/"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_route_needs_a_valid_key_and_the_public_ones_do_not() {
    let app = keyed_app().await;
    let client = reqwest::Client::new();
    for (method, path) in ROUTES {
        let path = path.replace("{id}", "pump-7");
        let method: Method = method.to_uppercase().parse().expect("method");
        let url = format!("{}{path}", app.http);
        let anonymous = client
            .request(method.clone(), &url)
            .send()
            .await
            .expect("request");
        if path.starts_with("/api/v1/") {
            assert_eq!(
                anonymous.status(),
                StatusCode::UNAUTHORIZED,
                "{method} {path}"
            );
            assert_eq!(
                anonymous
                    .headers()
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok()),
                Some("Bearer realm=\"fleetwatch\""),
                "{method} {path}"
            );
            let body = json_of(anonymous).await;
            assert!(
                body["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("API key")),
                "{body}"
            );
            let wrong = client
                .request(method.clone(), &url)
                .bearer_auth("nope")
                .send()
                .await
                .expect("request");
            assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED, "{method} {path}");
            // Either configured key works; a stream would never end, so only its head is read.
            for key in [KEY, "rotated-key"] {
                let accepted = client
                    .request(method.clone(), &url)
                    .bearer_auth(key)
                    .send()
                    .await
                    .expect("request");
                assert_ne!(
                    accepted.status(),
                    StatusCode::UNAUTHORIZED,
                    "{method} {path} with {key}"
                );
            }
        } else {
            assert_eq!(
                anonymous.status(),
                StatusCode::OK,
                "{method} {path} is public"
            );
        }
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_key_the_loopback_api_is_open() {
    let app = spawn_app(Broker::Embedded).await;
    let response = app.send(Method::GET, "/api/v1/devices").await;
    assert_eq!(response.status(), StatusCode::OK);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_are_registered_paged_filtered_fetched_and_deleted() {
    let app = keyed_app().await;
    let mut watcher = app.watch().await;
    for id in ["cam-1", "cam-2", "cam-3", "door-1"] {
        let response = app
            .request(Method::POST, "/api/v1/devices")
            .json(&json!({ "device_id": id }))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::CREATED, "{id}");
        assert_eq!(
            response
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok()),
            Some(format!("/api/v1/devices/{id}").as_str())
        );
        let body = json_of(response).await;
        assert_eq!(
            (body["device_id"].as_str(), body["status"].as_str()),
            (Some(id), Some("provisioning"))
        );
    }
    let event = watcher
        .expect("cam-1", Status::Provisioning, "registered")
        .await;
    assert_eq!(event.previous_status, None);

    let post = |body: Value| {
        app.request(Method::POST, "/api/v1/devices")
            .json(&body)
            .send()
    };
    assert_eq!(
        post(json!({ "device_id": "cam-1" }))
            .await
            .expect("request")
            .status(),
        StatusCode::CONFLICT
    );
    assert_eq!(
        post(json!({ "device_id": "bad id" }))
            .await
            .expect("request")
            .status(),
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(
        post(json!({ "name": "cam-9" }))
            .await
            .expect("request")
            .status(),
        StatusCode::UNPROCESSABLE_ENTITY
    );
    let malformed = app
        .request(Method::POST, "/api/v1/devices")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("request");
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    assert!(
        json_of(malformed).await["error"]
            .as_str()
            .is_some_and(|e| !e.is_empty())
    );

    // Pages of two, in id order.
    let page = app.get_json("/api/v1/devices?limit=2").await;
    let ids: Vec<_> = column(&page, "devices", "device_id");
    assert_eq!(ids, [json!("cam-1"), json!("cam-2")]);
    let cursor = page["next_cursor"].as_str().expect("a next page");
    let page = app
        .get_json(&format!("/api/v1/devices?limit=2&cursor={cursor}"))
        .await;
    let ids: Vec<_> = column(&page, "devices", "device_id");
    assert_eq!(ids, [json!("cam-3"), json!("door-1")]);
    assert!(
        page.get("next_cursor").is_none(),
        "absent on the last page, not null: {page}"
    );
    let cams = app.get_json("/api/v1/devices?prefix=cam").await;
    assert_eq!(cams["devices"].as_array().map(Vec::len), Some(3));
    let online = app.get_json("/api/v1/devices?status=online").await;
    assert_eq!(online["devices"].as_array().map(Vec::len), Some(0));
    for bad in ["status=asleep", "limit=0", "limit=many", "cursor=bad%20id"] {
        let response = app
            .send(Method::GET, &format!("/api/v1/devices?{bad}"))
            .await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{bad}");
        assert!(json_of(response).await["error"].is_string(), "{bad}");
    }

    let one = app.send(Method::GET, "/api/v1/devices/door-1").await;
    assert_eq!(one.status(), StatusCode::OK);
    assert_eq!(json_of(one).await["status"], "provisioning");
    for (path, status) in [
        ("/api/v1/devices/ghost-1", StatusCode::NOT_FOUND),
        ("/api/v1/devices/bad%20id", StatusCode::UNPROCESSABLE_ENTITY),
        ("/api/v1/devices/ghost-1/events", StatusCode::NOT_FOUND),
    ] {
        let response = app.send(Method::GET, path).await;
        assert_eq!(response.status(), status, "{path}");
        assert!(json_of(response).await["error"].is_string(), "{path}");
    }

    let deleted = app.send(Method::DELETE, "/api/v1/devices/door-1").await;
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    let again = app.send(Method::DELETE, "/api/v1/devices/door-1").await;
    assert_eq!(again.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        app.send(Method::GET, "/api/v1/devices/door-1")
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    // Its retained status is cleared: a new subscriber sees the others, not door-1.
    eventually(
        PATIENCE,
        "door-1's retained status to be cleared",
        || async {
            let mut late = app.watch().await;
            late.collect_for(Duration::from_millis(300)).await;
            let devices: BTreeSet<String> = late
                .history
                .iter()
                .map(|s| s.event.device_id.to_string())
                .collect();
            devices.contains("cam-1") && !devices.contains("door-1")
        },
    )
    .await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_heartbeat_is_handled_exactly_like_an_mqtt_one() {
    let app = keyed_app().await;
    let mut watcher = app.watch().await;
    let beat = |id: &str, body: &str| {
        app.request(Method::POST, &format!("/api/v1/devices/{id}/heartbeat"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
    };

    let first = beat("agent-1", r#"{"hostname":"srv-1","uptime_seconds":5}"#)
        .await
        .expect("request");
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(
        json_of(first).await,
        json!({"status": "ok", "registered": true, "pending_commands": []})
    );
    let event = watcher
        .expect("agent-1", Status::Online, "registered")
        .await;
    assert_eq!(event.previous_status, None);
    let again = beat("agent-1", "").await.expect("request");
    assert_eq!(json_of(again).await["registered"], false);

    let error = beat("agent-1", r#"{"status":"error","error":"disk full"}"#)
        .await
        .expect("request");
    assert_eq!(error.status(), StatusCode::OK);
    watcher
        .expect("agent-1", Status::Error, "device_error")
        .await;
    let device = app.get_json("/api/v1/devices/agent-1").await;
    assert_eq!(
        (device["error"].as_str(), device["hostname"].as_str()),
        (Some("disk full"), Some("srv-1"))
    );

    // The same device over MQTT continues the same story.
    let mqtt = app.device("agent-1", Duration::from_secs(3600)).await;
    watcher.expect("agent-1", Status::Online, "heartbeat").await;
    drop(mqtt);

    let too_big = format!("{{\"hostname\":\"{}\"}}", "x".repeat(70 * 1024));
    let too_deep = format!("{{\"x\":{}{}}}", "[".repeat(20), "]".repeat(20));
    // One rule: 400 when the body is not JSON, 422 when it is JSON but no heartbeat.
    for (id, body, status) in [
        ("agent-2", "{not json", StatusCode::BAD_REQUEST),
        ("agent-2", "[1,2]", StatusCode::UNPROCESSABLE_ENTITY),
        ("agent-2", "\"ok\"", StatusCode::UNPROCESSABLE_ENTITY),
        (
            "agent-2",
            too_deep.as_str(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "agent-2",
            r#"{"uptime_seconds":"long"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "agent-2",
            r#"{"status":"sleeping"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        ("agent-2", too_big.as_str(), StatusCode::PAYLOAD_TOO_LARGE),
        ("bad%20id", "{}", StatusCode::UNPROCESSABLE_ENTITY),
    ] {
        let response = beat(id, body).await.expect("request");
        assert_eq!(
            response.status(),
            status,
            "{id} {}",
            &body[..body.len().min(40)]
        );
        let error = json_of(response).await;
        assert!(
            error["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{error}"
        );
    }
    let not_utf8 = app
        .request(Method::POST, "/api/v1/devices/agent-2/heartbeat")
        .body(vec![b'{', 0xff, 0xfe, b'}'])
        .send()
        .await
        .expect("request");
    assert_eq!(not_utf8.status(), StatusCode::BAD_REQUEST);
    let parser = json_of(beat("agent-2", "{not json").await.expect("request")).await;
    assert!(
        parser["error"]
            .as_str()
            .is_some_and(|e| e.contains("line 1 column 2")),
        "the parser's message: {parser}"
    );
    assert_eq!(
        app.status_of("agent-2").await,
        None,
        "rejected heartbeats create nothing"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_newest_first_and_paged_and_summary_counts_statuses() {
    let app = keyed_app().await;
    let mut watcher = app.watch().await;
    for (body, status, reason) in [
        ("{}", Status::Online, "registered"),
        (r#"{"status":"error"}"#, Status::Error, "device_error"),
        ("{}", Status::Online, "heartbeat"),
    ] {
        let response = app
            .request(Method::POST, "/api/v1/devices/hist-1/heartbeat")
            .body(body)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::OK);
        watcher.expect("hist-1", status, reason).await;
    }
    let page = app.get_json("/api/v1/devices/hist-1/events?limit=2").await;
    let reasons: Vec<_> = column(&page, "events", "reason");
    assert_eq!(reasons, [json!("heartbeat"), json!("device_error")]);
    let cursor = page["next_cursor"].as_i64().expect("an older page");
    let page = app
        .get_json(&format!(
            "/api/v1/devices/hist-1/events?limit=2&cursor={cursor}"
        ))
        .await;
    let reasons: Vec<_> = column(&page, "events", "reason");
    assert_eq!(reasons, [json!("registered")]);
    assert!(page.get("next_cursor").is_none(), "{page}");

    app.request(Method::POST, "/api/v1/devices")
        .json(&json!({"device_id": "spare-1"}))
        .send()
        .await
        .expect("request");
    let summary = app.get_json("/api/v1/summary").await;
    assert_eq!(
        summary,
        json!({"provisioning": 1, "online": 1, "offline": 0, "error": 0, "total": 2})
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_methods_answer_in_json() {
    let app = keyed_app().await;
    let missing = app.send(Method::GET, "/api/v1/nothing-here").await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert!(json_of(missing).await["error"].is_string());
    let wrong = app.send(Method::PUT, "/api/v1/devices").await;
    assert_eq!(wrong.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert!(wrong.headers().contains_key("allow"));
    assert!(json_of(wrong).await["error"].is_string());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_ok_when_every_part_works_and_names_the_part_that_does_not() {
    let app = spawn_app(Broker::Embedded).await;
    let healthy = reqwest::get(format!("{}/healthz", app.http))
        .await
        .expect("request");
    assert_eq!(healthy.status(), StatusCode::OK);
    assert_eq!(
        json_of(healthy).await,
        json!({"status": "ok", "database": "ok", "broker": "ok", "publisher": "ok"})
    );
    for probe in ["/readyz", "/livez"] {
        let response = reqwest::get(format!("{}{probe}", app.http))
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::OK, "{probe}");
        assert_eq!(json_of(response).await, json!({"status": "ok"}), "{probe}");
    }
    app.stop().await;

    // A hub whose external broker is not there.
    let database = TestDatabase::create(Database::Sqlite).await;
    let nobody = firmware_sim::BrokerUrl::new("127.0.0.1", free_port());
    let settings = test_settings(&Broker::External(nobody), &database);
    let app = fleetwatch::app::Application::build(settings)
        .await
        .expect("builds without its broker");
    let url = format!("http://{}/healthz", app.http_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let hub = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let unhealthy = reqwest::get(&url).await.expect("request");
    assert_eq!(unhealthy.status(), StatusCode::SERVICE_UNAVAILABLE);
    let report = json_of(unhealthy).await;
    assert_eq!(
        (report["status"].as_str(), report["database"].as_str()),
        (Some("unavailable"), Some("ok"))
    );
    assert!(
        report["broker"]
            .as_str()
            .is_some_and(|b| b.contains("not subscribed")),
        "{report}"
    );
    // Readiness is about taking heartbeats: HTTP ones need no broker.
    let base = url.trim_end_matches("/healthz");
    for probe in ["/readyz", "/livez"] {
        let response = reqwest::get(format!("{base}{probe}"))
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::OK, "{probe}");
    }
    let _ = stop.send(());
    within(PATIENCE, "the hub to stop", hub)
        .await
        .expect("join")
        .expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened() {
    let app = spawn_app(Broker::Embedded).await;
    let mut watcher = app.watch().await;
    let _device = app.device("counted-1", Duration::from_secs(3600)).await;
    watcher
        .expect("counted-1", Status::Online, "registered")
        .await;
    let raw = app.raw("vandal").await;
    raw.publish("devices/counted-2/heartbeat", b"[1]".to_vec())
        .await
        .expect("publish");
    eventually(PATIENCE, "the rejection to be counted", || async {
        app.metrics
            .rejected(fleetwatch::heartbeat::RejectReason::NotAnObject)
            == 1
    })
    .await;
    let response = reqwest::get(format!("{}/metrics", app.http))
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .is_ok_and(|t| t.starts_with("text/plain"))
    );
    let text = response.text().await.expect("text");
    for sample in [
        "fleetwatch_heartbeats_received_total{transport=\"mqtt\"} 1",
        "fleetwatch_heartbeats_rejected_total{reason=\"not_an_object\"} 1",
        "fleetwatch_transitions_total{status=\"online\"} 1",
        "fleetwatch_devices{status=\"online\"} 1",
        "fleetwatch_flush_duration_seconds_count",
        "fleetwatch_flush_batch_rows_bucket{le=\"+Inf\"}",
        "fleetwatch_check_duration_seconds_count",
        "fleetwatch_queue_depth",
    ] {
        assert!(text.contains(sample), "missing {sample:?} in\n{text}");
    }
    eventually(PATIENCE, "the event to be acknowledged", || async {
        reqwest::get(format!("{}/metrics", app.http))
            .await
            .expect("request")
            .text()
            .await
            .expect("text")
            .contains("fleetwatch_events_published_total 1")
    })
    .await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_follows_status_changes_live() {
    let app = keyed_app().await;
    let mut stream = app.send(Method::GET, "/api/v1/stream").await;
    assert_eq!(stream.status(), StatusCode::OK);
    assert!(
        stream.headers()["content-type"]
            .to_str()
            .is_ok_and(|t| t.starts_with("text/event-stream"))
    );
    let _device = app.device("live-1", Duration::from_secs(3600)).await;
    let mut received = String::new();
    within(PATIENCE, "a status event on the stream", async {
        while !received.contains("\"device_id\":\"live-1\"") {
            let chunk = stream.chunk().await.expect("stream open").expect("a chunk");
            received.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await;
    assert!(received.contains("event: status"), "{received}");
    app.send(Method::DELETE, "/api/v1/devices/live-1").await;
    within(PATIENCE, "the deletion on the stream", async {
        while !received.contains("event: deleted") {
            let chunk = stream.chunk().await.expect("stream open").expect("a chunk");
            received.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await;
    // Shutting down ends open streams instead of waiting for them forever.
    within(PATIENCE, "the hub to stop with a stream open", app.stop()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_lists_every_route_and_each_answers_as_documented() {
    let app = keyed_app().await;
    let doc = app.get_json("/api/v1/openapi.json").await;
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, _) in item.as_object().expect("path item") {
            documented.insert((method.clone(), path.clone()));
        }
    }
    let routes: BTreeSet<_> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(
        documented, routes,
        "the document and the router list the same routes"
    );

    // Each operation, called with plausible input, answers with a status it documents.
    app.request(Method::POST, "/api/v1/devices")
        .json(&json!({"device_id": "doc-1"}))
        .send()
        .await
        .expect("request");
    for (method, path) in &routes {
        if path == "/api/v1/stream" {
            continue; // an endless stream; covered by its own test
        }
        let operation = &doc["paths"][path][method];
        let codes: BTreeSet<String> = operation["responses"]
            .as_object()
            .expect("responses")
            .keys()
            .cloned()
            .collect();
        let concrete = path.replace("{id}", if method == "delete" { "doc-1" } else { "doc-2" });
        let mut request = app.request(method.to_uppercase().parse().expect("method"), &concrete);
        if method == "post" && path == "/api/v1/devices" {
            request = request.json(&json!({"device_id": "doc-3"}));
        }
        let status = request.send().await.expect("request").status();
        assert!(
            codes.contains(status.as_str()),
            "{method} {path} answered {status}, documented {codes:?}"
        );
        let anonymous = reqwest::Client::new()
            .request(
                method.to_uppercase().parse().expect("method"),
                format!("{}{concrete}", app.http),
            )
            .send()
            .await
            .expect("request")
            .status();
        assert!(
            codes.contains(anonymous.as_str()),
            "{method} {path} without a key answered {anonymous}, documented {codes:?}"
        );
    }
    assert!(doc["components"]["securitySchemes"]["api_key"].is_object());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_page_is_served() {
    let app = keyed_app().await;
    let response = reqwest::get(format!("{}/", app.http))
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .is_ok_and(|t| t.starts_with("text/html"))
    );
    let page = response.text().await.expect("text");
    assert!(page.contains("fleetwatch"));
    assert!(
        page.contains("/api/v1/stream"),
        "the page follows the live stream"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_cap_or_the_timeout_are_answered_503_and_probes_still_answer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let app = spawn_app_with(Broker::Embedded, |s| {
        s.http.max_requests = 1;
        s.http.request_timeout = Duration::from_secs(6);
    })
    .await;
    // A request in progress: its body arrives slowly, so it holds the one slot.
    let addr = app.http.trim_start_matches("http://").to_string();
    let start_slow = || async {
        let mut slow = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        slow.write_all(
            b"POST /api/v1/devices/slow-1/heartbeat HTTP/1.1\r\nHost: hub\r\n\
              Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
        )
        .await
        .expect("half a request");
        slow
    };
    let mut slow = start_slow().await;
    let turned_away = within(PATIENCE, "a request to be turned away", async {
        loop {
            let response = app.send(Method::GET, "/api/v1/summary").await;
            if response.status() != StatusCode::OK {
                return response;
            }
            // The summary may have held the slot when the slow request came, and the
            // slow one was turned away instead: start it again.
            let mut probe = [0u8; 64];
            match slow.try_read(&mut probe) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                _ => slow = start_slow().await,
            }
        }
    })
    .await;
    assert_eq!(turned_away.status(), StatusCode::SERVICE_UNAVAILABLE);
    let error = json_of(turned_away).await["error"].to_string();
    assert!(error.contains("http.max_requests"), "{error}");
    // Probes are not counted against the cap.
    let live = app.send(Method::GET, "/livez").await;
    assert_eq!(live.status(), StatusCode::OK);

    // The slow request itself is answered once http.request_timeout has passed.
    let mut answer = Vec::new();
    within(PATIENCE, "the slow request to be answered", async {
        let mut buf = [0u8; 1024];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = slow.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed without an answer");
            answer.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let head = String::from_utf8_lossy(&answer);
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    let ok = app.send(Method::GET, "/api/v1/summary").await;
    assert_eq!(ok.status(), StatusCode::OK, "the slot is free again");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_responses_does_not_hold_up_shutdown() {
    use tokio::io::AsyncWriteExt;

    let app = spawn_app_with(Broker::Embedded, |s| {
        s.devices.registration_rate = 0.0;
    })
    .await;
    // A live stream whose reader never reads: once the socket buffers are full, the
    // hub's write blocks, and its connection task with it.
    let addr = app.http.trim_start_matches("http://").to_string();
    let mut stuck = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    stuck
        .write_all(b"GET /api/v1/stream HTTP/1.1\r\nHost: hub\r\n\r\n")
        .await
        .expect("request sent");
    // Megabytes of status events for it.
    let flooder = app.raw("stream-filler").await;
    for i in 0..20_000 {
        flooder
            .publish(&format!("devices/filler-{i}/heartbeat"), b"{}".to_vec())
            .await
            .expect("publish");
    }
    eventually(PATIENCE, "20,000 devices registered", || async {
        app.get_json("/api/v1/summary").await["total"] == 20_000
    })
    .await;
    // Stops: the HTTP side drains for 5 s, then closes what is left.
    within(Duration::from_secs(20), "the hub to stop", app.stop()).await;
    drop(stuck);
}
