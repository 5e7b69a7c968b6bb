//! The binary's edges: configuration errors, overrides, the port check, `check` and
//! `devices`.

use std::time::Duration;

use fleetwatch::status::Status;

use crate::helpers::*;
use crate::restart::{HubProcess, hub_env};

#[tokio::test]
async fn a_bad_value_exits_2_with_one_line_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (var, value, key) in [
        (
            "FLEETWATCH_HEARTBEAT__OFFLINE_AFTER",
            "banana",
            "heartbeat.offline_after",
        ),
        ("FLEETWATCH_MQTT__BROKER", "carrier_pigeon", "mqtt.broker"),
        (
            "FLEETWATCH_HEARTBEAT_OFFLINE_AFTER",
            "90s",
            "FLEETWATCH_HEARTBEAT__OFFLINE_AFTER",
        ),
    ] {
        let mut hub = HubProcess::spawn(dir.path(), &[], &[(var, value.to_string())]);
        let status = hub.wait().await;
        assert_eq!(status.code(), Some(2), "{var}={value}: {status:?}");
        assert_eq!(
            hub.log.len(),
            1,
            "{var}={value}: one line, got {:?}",
            hub.log
        );
        assert!(hub.log[0].contains(key), "{var}={value}: {:?}", hub.log);
        assert!(!hub.log[0].contains("panicked"), "{:?}", hub.log);
    }
}

#[tokio::test]
async fn an_environment_override_takes_effect() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let db = dir.path().join("override.db");
    let mut env = hub_env(port, &db);
    env.push(("FLEETWATCH_HEARTBEAT__OFFLINE_AFTER", "7m".into()));
    let mut hub = HubProcess::spawn(dir.path(), &[], &env);
    hub.wait_for_line("fleetwatch ready").await;
    let ready = hub.log.last().expect("ready line").clone();
    assert!(ready.contains(&format!("127.0.0.1:{port}")), "{ready}");
    assert!(ready.contains("offline_after=7m"), "{ready}");
    assert!(
        db.exists(),
        "database created where FLEETWATCH_DATABASE__URL says"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "broker on the overridden port"
    );
    hub.terminate();
    assert!(hub.wait().await.success());
}

#[tokio::test]
async fn a_taken_mqtt_port_is_one_plain_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let db = dir.path().join("x.db");
    let mut hub = HubProcess::spawn(dir.path(), &[], &hub_env(port, &db));
    let status = hub.wait().await;
    assert_eq!(status.code(), Some(1));
    let errors: Vec<_> = hub
        .log
        .iter()
        .filter(|l| l.contains("already in use"))
        .collect();
    assert_eq!(errors.len(), 1, "{:?}", hub.log);
    assert!(errors[0].contains("mqtt.listen"), "{:?}", errors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_devices_commands_read_the_database_and_the_hub_publishes_checks() {
    let app = spawn_app_with(Broker::Embedded, |s| {
        s.heartbeat.offline_after = Duration::from_secs(3600)
    })
    .await;
    let mut watcher = app.watch().await;
    let device = app.device("cron-1", Duration::from_secs(3600)).await;
    watcher.expect("cron-1", Status::Online, "registered").await;
    device.silence().await.expect("silence");

    let db = app.db_path().to_path_buf();
    let dir = tempfile::tempdir().expect("tempdir");
    // With a one-second deadline, a CLI pass finds the device overdue.
    let env = [
        (
            "FLEETWATCH_DATABASE__URL",
            format!("sqlite://{}", db.display()),
        ),
        ("FLEETWATCH_HEARTBEAT__OFFLINE_AFTER", "1s".into()),
    ];
    eventually(PATIENCE, "`fleetwatch check` to report cron-1", || async {
        let mut check = HubProcess::spawn(dir.path(), &["check"], &env);
        assert!(check.wait().await.success());
        check.stdout().await.lines().any(|l| l == "cron-1")
    })
    .await;
    // The running hub publishes what the CLI committed.
    let event = watcher
        .expect("cron-1", Status::Offline, "heartbeat_timeout")
        .await;
    assert_eq!(event.previous_status, Some(Status::Online));

    let mut list = HubProcess::spawn(
        dir.path(),
        &["devices", "--status", "offline", "--json"],
        &env,
    );
    assert!(list.wait().await.success());
    let devices: serde_json::Value = serde_json::from_str(&list.stdout().await).expect("json");
    assert_eq!(devices[0]["device_id"], "cron-1");
    assert_eq!(devices[0]["status"], "offline");
    let mut table = HubProcess::spawn(dir.path(), &["devices"], &env);
    assert!(table.wait().await.success());
    let out = table.stdout().await;
    assert!(
        out.lines()
            .any(|l| l.starts_with("cron-1") && l.contains("offline")),
        "{out}"
    );
    app.stop().await;
}

/// rumqttd 0.20 (bytebeamio/rumqtt#1062): a client id it refuses after CONNECT,
/// connecting twice, leaves its listener refusing everyone new. The hub must notice
/// and stop with a clear error, not run on deaf to reconnecting devices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_broker_that_stops_accepting_stops_the_hub_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let db = dir.path().join("x.db");
    let mut hub = HubProcess::spawn(dir.path(), &[], &hub_env(port, &db));
    hub.wait_for_line("subscribed to device heartbeats").await;
    for _ in 0..2 {
        let options = rumqttc::MqttOptions::new("site/pump-7", "127.0.0.1", port);
        let (_client, mut eventloop) = rumqttc::AsyncClient::new(options, 1);
        // Refused without a CONNACK: the connection is just closed.
        let outcome = within(
            PATIENCE,
            "the broker to drop the bad client",
            eventloop.poll(),
        )
        .await;
        assert!(outcome.is_err(), "{outcome:?}");
    }
    // Five failed probes three seconds apart.
    let status = hub.wait_up_to(Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(1), "{}", hub.log.join("\n"));
    let log = hub.log.join("\n");
    assert!(log.contains("no longer accepts new connections"), "{log}");
    assert!(
        log.contains("Mosquitto"),
        "the message says what to do: {log}"
    );
}
