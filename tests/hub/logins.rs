//! The embedded broker with `mqtt.require_login`: a device logs in as itself with the
//! secret `POST /api/v1/devices/{id}/credentials` issued; anything else is refused at
//! CONNECT and changes nothing, while the hub's own connections still get in.

use std::time::Duration;

use fleetwatch::status::Status;
use reqwest::{Method, StatusCode};
use rumqttc::{AsyncClient, ConnectReturnCode, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::helpers::*;

/// The hub's client id prefix in these tests, so a test can try to take its ids.
const HUB: &str = "hubtest";

async fn login_app() -> TestApp {
    spawn_app_with(Broker::Embedded, |s| {
        s.mqtt.require_login = true;
        s.mqtt.client_id = HUB.into();
    })
    .await
}

async fn register(app: &TestApp, id: &str) {
    let response = app
        .request(Method::POST, "/api/v1/devices")
        .json(&json!({ "device_id": id }))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::CREATED, "register {id}");
}

/// Issues `id`'s secret and returns the whole answer (status, headers, body).
async fn issue(app: &TestApp, id: &str) -> reqwest::Response {
    app.send(Method::POST, &format!("/api/v1/devices/{id}/credentials"))
        .await
}

async fn secret_for(app: &TestApp, id: &str) -> String {
    let response = issue(app, id).await;
    assert_eq!(response.status(), StatusCode::CREATED, "issue {id}");
    let body: Value = response.json().await.expect("JSON");
    body["secret"].as_str().expect("a secret").to_string()
}

/// A device's MQTT connection, kept polled so what it publishes goes out.
struct Connected {
    client: AsyncClient,
    task: JoinHandle<()>,
}

impl Connected {
    async fn heartbeat(&self, id: &str) {
        self.client
            .publish(
                format!("devices/{id}/heartbeat"),
                QoS::AtLeastOnce,
                false,
                b"{}".to_vec(),
            )
            .await
            .expect("publish queued");
    }

    async fn close(self) {
        let _ = self.client.disconnect().await;
        // The event loop ends once disconnected; if it does not, it is dropped.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.task).await;
    }
}

/// Connects as `client_id` with a login; `Err` says how it was refused (a CONNACK
/// that is not success, or the broker closing the connection, which is what rumqttd
/// does when its auth handler says no).
async fn connect(
    app: &TestApp,
    client_id: &str,
    login: Option<(&str, &str)>,
) -> Result<Connected, String> {
    let mut options = MqttOptions::new(client_id, app.url.host.clone(), app.url.port);
    options.set_keep_alive(Duration::from_secs(5));
    if let Some((user, password)) = login {
        options.set_credentials(user, password);
    }
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    let acked = tokio::time::timeout(PATIENCE, connack(&mut eventloop))
        .await
        .unwrap_or_else(|_| Err("no answer to CONNECT".into()));
    acked?;
    let task = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    Ok(Connected { client, task })
}

async fn connack(eventloop: &mut EventLoop) -> Result<(), String> {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) if ack.code == ConnectReturnCode::Success => {
                return Ok(());
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => return Err(format!("{:?}", ack.code)),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

async fn refused(app: &TestApp, client_id: &str, login: Option<(&str, &str)>) {
    if let Ok(connected) = connect(app, client_id, login).await {
        connected.close().await;
        panic!(
            "{client_id} with {:?} was let in",
            login.map(|(user, _)| user)
        );
    }
}

async fn total(app: &TestApp) -> u64 {
    app.get_json("/api/v1/summary").await["total"]
        .as_u64()
        .expect("total")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_device_logs_in_with_its_secret_and_its_heartbeats_count() {
    let app = login_app().await;
    register(&app, "pump-7").await;
    let response = issue(&app, "pump-7").await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(
        response
            .headers()
            .get("cache-control")
            .and_then(|v| v.to_str().ok()),
        Some("no-store")
    );
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["device_id"], "pump-7");
    assert_eq!(body["username"], "pump-7");
    let secret = body["secret"].as_str().expect("secret");
    assert_eq!(secret.len(), 43, "256 bits, unpadded base64url");

    let device = connect(&app, "pump-7", Some(("pump-7", secret)))
        .await
        .expect("the device logs in");
    device.heartbeat("pump-7").await;
    eventually(PATIENCE, "pump-7 online", || async {
        app.status_of("pump-7").await == Some(Status::Online)
    })
    .await;
    // The hub's own connections log in too: its probes of the embedded broker pass.
    let health = app.send(Method::GET, "/healthz").await;
    assert_eq!(health.status(), StatusCode::OK);
    device.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_cannot_connect() {
    let app = login_app().await;
    register(&app, "pump-7").await;
    let secret = secret_for(&app, "pump-7").await;
    refused(&app, "pump-7", Some(("pump-7", "wrong"))).await;
    refused(&app, "pump-7", Some(("pump-7", &secret[..42]))).await;
    refused(&app, "pump-7", Some(("pump-7", ""))).await;
    refused(&app, "pump-7", None).await;
    assert_eq!(app.status_of("pump-7").await, Some(Status::Provisioning));
    // The refusals did not break the broker: the right secret still gets in.
    connect(&app, "pump-7", Some(("pump-7", &secret)))
        .await
        .expect("the right secret logs in")
        .close()
        .await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_client_ids_unknown_devices_and_the_hubs_ids_are_refused_and_change_nothing() {
    let app = login_app().await;
    register(&app, "pump-7").await;
    let secret = secret_for(&app, "pump-7").await;
    // Its secret, but another client id (and so, in practice, another device's).
    refused(&app, "pump-8", Some(("pump-7", &secret))).await;
    // A device nobody registered, and one registered without a credential.
    refused(&app, "ghost", Some(("ghost", &secret))).await;
    register(&app, "no-secret").await;
    refused(&app, "no-secret", Some(("no-secret", &secret))).await;
    // A device whose id is one of the hub's client ids cannot take the hub's place.
    register(&app, &format!("{HUB}-ingest")).await;
    let impostor = secret_for(&app, &format!("{HUB}-ingest")).await;
    let hub_id = format!("{HUB}-ingest");
    refused(&app, &hub_id, Some((&hub_id, &impostor))).await;
    refused(&app, &hub_id, Some((HUB, &impostor))).await;

    assert_eq!(app.status_of("pump-7").await, Some(Status::Provisioning));
    assert_eq!(app.status_of("ghost").await, None);
    assert_eq!(app.status_of("no-secret").await, Some(Status::Provisioning));
    assert_eq!(total(&app).await, 3);
    // The hub kept its own connection throughout.
    assert!(
        app.listening.borrow().is_some(),
        "the hub is still subscribed"
    );
    let health = app.send(Method::GET, "/healthz").await;
    assert_eq!(health.status(), StatusCode::OK);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_secret_locks_out_the_old_one_and_revoking_locks_out_both() {
    let app = login_app().await;
    register(&app, "pump-7").await;
    let first = secret_for(&app, "pump-7").await;
    connect(&app, "pump-7", Some(("pump-7", &first)))
        .await
        .expect("first secret")
        .close()
        .await;
    let second = secret_for(&app, "pump-7").await;
    assert_ne!(first, second);
    refused(&app, "pump-7", Some(("pump-7", &first))).await;
    connect(&app, "pump-7", Some(("pump-7", &second)))
        .await
        .expect("second secret")
        .close()
        .await;

    let revoked = app
        .send(Method::DELETE, "/api/v1/devices/pump-7/credentials")
        .await;
    assert_eq!(revoked.status(), StatusCode::NO_CONTENT);
    refused(&app, "pump-7", Some(("pump-7", &second))).await;
    assert!(app.stored("pump-7").await.is_some(), "the device stays");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_credentials_route_knows_only_registered_devices_and_never_shows_a_secret_again() {
    let app = login_app().await;
    for method in [Method::POST, Method::DELETE] {
        let response = app
            .send(method.clone(), "/api/v1/devices/ghost/credentials")
            .await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{method}");
        let body: Value = response.json().await.expect("JSON");
        assert!(body["error"].as_str().is_some(), "{body}");
    }
    assert_eq!(app.status_of("ghost").await, None, "nothing was created");
    let invalid = app
        .send(Method::POST, "/api/v1/devices/a%2Bb/credentials")
        .await;
    assert_eq!(invalid.status(), StatusCode::UNPROCESSABLE_ENTITY);

    register(&app, "pump-7").await;
    let secret = secret_for(&app, "pump-7").await;
    // No route reads it back, and nothing the API shows carries it.
    let read = app
        .send(Method::GET, "/api/v1/devices/pump-7/credentials")
        .await;
    assert_eq!(read.status(), StatusCode::METHOD_NOT_ALLOWED);
    for path in ["/api/v1/devices/pump-7", "/api/v1/devices"] {
        let shown = app.get_json(path).await.to_string();
        assert!(!shown.contains(&secret), "{path}: {shown}");
    }
    app.stop().await;
}
