//! Several hubs: two `fleetwatch` processes read heartbeats through one shared
//! subscription on a real Mosquitto and share one PostgreSQL database.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use firmware_sim::{BrokerUrl, SimDevice};
use fleetwatch::status::Status;
use fleetwatch::storage::postgres::scratch::ScratchDatabase;

use crate::database::{Database, TestDatabase};
use crate::helpers::*;
use crate::mosquitto::Mosquitto;
use crate::restart::HubProcess;

const DEVICES: usize = 500;
const BEAT: Duration = Duration::from_millis(500);
/// Six missed beats: generous on a loaded 2-core machine running two hubs, a broker,
/// a database and 500 simulated devices.
const DEADLINE: Duration = Duration::from_secs(3);
const LONG: Duration = Duration::from_secs(60);

/// What each device does, by its index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Beats to the end.
    Steady,
    /// Stops beating, keeps its connection: offline at its deadline.
    Silent,
    /// Its connection is cut (the broker publishes its Will), then it comes back.
    Reconnecting,
    /// Silent past its deadline and back, twice (once after a hub was killed).
    Flapping,
}

fn role(index: usize) -> Role {
    match index {
        0..100 => Role::Silent,
        100..150 => Role::Reconnecting,
        150..200 => Role::Flapping,
        _ => Role::Steady,
    }
}

/// Every transition a device of `role` goes through, in order.
fn expected(role: Role) -> Vec<(Status, &'static str)> {
    let online = (Status::Online, "registered");
    let timeout = (Status::Offline, "heartbeat_timeout");
    let back = (Status::Online, "heartbeat");
    match role {
        Role::Steady => vec![online],
        Role::Silent => vec![online, timeout],
        Role::Reconnecting => vec![online, (Status::Offline, "connection_lost"), back],
        Role::Flapping => vec![online, timeout, back, timeout, back],
    }
}

fn id(index: usize) -> String {
    format!("dev-{index:03}")
}

fn hub_env(url: &BrokerUrl, db: &ScratchDatabase, name: &str) -> Vec<(&'static str, String)> {
    vec![
        ("FLEETWATCH_MQTT__BROKER", "external".into()),
        ("FLEETWATCH_MQTT__URL", url.to_string()),
        ("FLEETWATCH_MQTT__CLIENT_ID", name.into()),
        ("FLEETWATCH_MQTT__SHARED_GROUP", "hubs".into()),
        ("FLEETWATCH_DATABASE__URL", db.url.clone()),
        ("FLEETWATCH_HTTP__LISTEN", "127.0.0.1:0".into()),
        (
            "FLEETWATCH_HEARTBEAT__OFFLINE_AFTER",
            format!("{}ms", DEADLINE.as_millis()),
        ),
        ("FLEETWATCH_HEARTBEAT__CHECK_INTERVAL", "100ms".into()),
        ("FLEETWATCH_HEARTBEAT__FLUSH_INTERVAL", "50ms".into()),
    ]
}

async fn start_devices(url: &BrokerUrl, indexes: impl Iterator<Item = usize>) -> Vec<SimDevice> {
    let mut devices = Vec::new();
    for index in indexes {
        devices.push(sim_device(url, &id(index), BEAT).await);
    }
    devices
}

/// Waits until each of `devices` has had `n` distinct events of `status`.
async fn wait_for(
    watcher: &mut StatusWatcher,
    status: Status,
    devices: std::ops::Range<usize>,
    n: usize,
) {
    let ids: HashSet<String> = devices.map(id).collect();
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let mut seen: BTreeMap<&str, HashSet<uuid::Uuid>> = BTreeMap::new();
        for s in &watcher.history {
            if s.event.status == status && ids.contains(s.event.device_id.as_str()) {
                seen.entry(s.event.device_id.as_str())
                    .or_default()
                    .insert(s.event.event_id);
            }
        }
        let mut lacking: Vec<&str> = ids
            .iter()
            .map(String::as_str)
            .filter(|id| seen.get(id).is_none_or(|e| e.len() < n))
            .collect();
        if lacking.is_empty() {
            return;
        }
        lacking.sort_unstable();
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {} devices did not have {n} {status} event(s) within {LONG:?}: {lacking:?}",
            lacking.len(),
            ids.len()
        );
        watcher.collect_for(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hubs_report_every_transition_once_and_one_carries_on_when_the_other_is_killed() {
    let _heavy = heavy().await;
    init_logging();
    let mosquitto = Mosquitto::start();
    let url = mosquitto.url.clone();
    let db = ScratchDatabase::create().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut hub_a = HubProcess::spawn(dir.path(), &[], &hub_env(&url, &db, "hub-a"));
    hub_a.wait_for_line("subscribed to device heartbeats").await;
    // Started first, hub A leads: killing it below makes hub B take the outbox over.
    hub_a
        .wait_for_line("this hub publishes status events")
        .await;
    let mut hub_b = HubProcess::spawn(dir.path(), &[], &hub_env(&url, &db, "hub-b"));
    hub_b.wait_for_line("subscribed to device heartbeats").await;

    let mut watcher = StatusWatcher::connect(&url).await;
    let mut devices = start_devices(&url, 0..DEVICES).await;
    watcher
        .wait_for_devices(Status::Online, DEVICES, LONG)
        .await;

    // Silent and flapping devices stop; reconnecting ones lose their connection.
    for index in (0..100).chain(150..200) {
        devices[index].silence().await.expect("silence");
    }
    let cut: Vec<SimDevice> = devices.drain(100..150).collect();
    for device in cut {
        device.cut_connection().await;
    }
    wait_for(&mut watcher, Status::Offline, 100..150, 1).await;
    let back = start_devices(&url, 100..150).await;
    wait_for(&mut watcher, Status::Offline, 0..100, 1).await;
    wait_for(&mut watcher, Status::Offline, 150..200, 1).await;
    // `devices` lost 100..150 above: the flapping ones now sit at 100..150 of it.
    let flapping = 100..150;
    for offset in flapping.clone() {
        devices[offset].resume().await.expect("resume");
    }
    wait_for(&mut watcher, Status::Online, 100..200, 2).await;

    // The leading hub dies mid-run; the other takes its share of the heartbeats, its
    // offline checks, and the outbox.
    hub_a.kill().await;
    hub_b
        .wait_for_line("this hub publishes status events")
        .await;
    for offset in flapping.clone() {
        devices[offset].silence().await.expect("silence");
    }
    wait_for(&mut watcher, Status::Offline, 150..200, 2).await;
    for offset in flapping {
        devices[offset].resume().await.expect("resume");
    }
    wait_for(&mut watcher, Status::Online, 150..200, 3).await;
    // Anything still on its way (a repeat from a takeover, a transition too many).
    watcher.collect_for(DEADLINE + BEAT).await;
    assert!(hub_b.is_running(), "the surviving hub carried on");

    // The database holds exactly the transitions each device went through.
    let store = fleetwatch::storage::connect(&db.url)
        .await
        .expect("open the hubs' database");
    let mut wrong = BTreeMap::new();
    let mut stored_ids = HashSet::new();
    for index in 0..DEVICES {
        let device = id(index).parse().expect("id");
        let mut events = store.events(&device, None, 100).await.expect("history");
        events.reverse();
        let got: Vec<(Status, String)> = events
            .iter()
            .map(|e| (e.event.status, e.event.reason.as_str().to_string()))
            .collect();
        let want: Vec<(Status, String)> = expected(role(index))
            .into_iter()
            .map(|(status, reason)| (status, reason.to_string()))
            .collect();
        if got != want {
            wrong.insert(id(index), (role(index), got));
        }
        stored_ids.extend(events.iter().map(|e| e.event.event_id));
    }
    assert!(
        wrong.is_empty(),
        "{} devices' transitions are not exactly their own: {wrong:#?}",
        wrong.len()
    );

    // Every stored transition was published, and nothing else was: a repeat after the
    // takeover carries the same id.
    let published: HashSet<_> = watcher.history.iter().map(|s| s.event.event_id).collect();
    let missing = stored_ids.difference(&published).count();
    let invented = published.difference(&stored_ids).count();
    assert_eq!(
        (missing, invented),
        (0, 0),
        "{} stored transitions, {} published ids",
        stored_ids.len(),
        published.len()
    );

    drop(back);
    drop(devices);
    hub_b.terminate();
    assert!(
        hub_b.wait().await.success(),
        "log:\n{}",
        hub_b.log.join("\n")
    );
}

/// A hub under test on the shared Mosquitto and database.
async fn in_process_hub(url: &BrokerUrl, db: &Arc<TestDatabase>) -> TestApp {
    let mut settings = test_settings(&Broker::External(url.clone()), db);
    settings.mqtt.shared_group = "hubs".into();
    start(settings, Arc::clone(db)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_hubs_live_stream_shows_every_hubs_transitions() {
    let mosquitto = Mosquitto::start();
    let db = Arc::new(TestDatabase::create(Database::Postgres).await);
    let (one, two) = (
        in_process_hub(&mosquitto.url, &db).await,
        in_process_hub(&mosquitto.url, &db).await,
    );
    let mut stream = two.send(reqwest::Method::GET, "/api/v1/stream").await;
    assert_eq!(stream.status(), reqwest::StatusCode::OK);
    // Committed by hub one, through its API.
    let registered = one
        .request(reqwest::Method::POST, "/api/v1/devices")
        .json(&serde_json::json!({"device_id": "spare-1"}))
        .send()
        .await
        .expect("register");
    assert_eq!(registered.status(), reqwest::StatusCode::CREATED);
    let mut received = String::new();
    within(
        PATIENCE,
        "hub one's transition on hub two's stream",
        async {
            while !received.contains("\"device_id\":\"spare-1\"") {
                let chunk = stream.chunk().await.expect("stream open").expect("a chunk");
                received.push_str(&String::from_utf8_lossy(&chunk));
            }
        },
    )
    .await;
    assert!(
        received.contains("\"status\":\"provisioning\""),
        "{received}"
    );
    one.stop().await;
    two.stop().await;
}
